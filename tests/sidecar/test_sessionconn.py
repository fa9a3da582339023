"""The session side: idle watching, RETIRE races, Connection: close, release states."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from backdial.sidecar.lease import Lease
from backdial.sidecar.sessionconn import SessionConn
from backdial.wire import RETIRE_LINE
from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]


# -- through the proxy, with real session sockets -------------------------------------------------
def test_retire_while_idle_reports_lost(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /retire-idle HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200
    assert proxy.wait_for(lambda: ("lost", 1, "retired") in proxy.pool.events)
    assert proxy.pool.states() == ["idle"]
    c.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")  # a fresh session serves the next one
    assert c.read_response().json()["session"] == 2


def test_garbage_while_idle_is_broken(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /garbage-idle HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200
    assert proxy.wait_for(lambda: ("lost", 1, "broken") in proxy.pool.events)


def test_eof_while_idle_is_broken(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200
    proxy.backend.socks[0].shutdown(socket.SHUT_RDWR)
    assert proxy.wait_for(lambda: ("lost", 1, "broken") in proxy.pool.events)


def test_retire_before_status_line_is_stripped(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /retire-before HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.body == b"after retire"
    assert r.header("connection") is None  # the session closes, not the client connection
    assert proxy.pool.states() == ["retired"]


def test_retire_right_after_response(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /retire-after HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().body == b"then retire"
    assert proxy.wait_for(lambda: proxy.pool.states() == ["retired"])


def test_retire_split_after_response(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /retire-split HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().body == b"then retire"
    assert proxy.wait_for(lambda: ("lost", 1, "retired") in proxy.pool.events)


def test_connection_close_from_service_retires(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.body == b"closing" and r.header("connection") is None
    assert proxy.pool.states() == ["retired"]


# -- unit level: byte splits no socket test can force ---------------------------------------------
class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def resp_head(
        self, status: int, reason: bytes, lines: list[bytes], length: int, chunked: bool
    ) -> None:
        self.events.append(("head", (status, reason, b"".join(lines), length, chunked)))

    def resp_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None:
        self.events.append(("interim", status))

    def resp_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def resp_flush(self) -> None:
        pass

    def resp_done(self, state: str) -> None:
        self.events.append(("done", state))

    def resp_failed(self, started: bool) -> None:
        self.events.append(("failed", started))

    def upstream_writable(self, writable: bool) -> None:
        self.events.append(("writable", writable))


def _conn() -> tuple[SessionConn, _Transport, Any]:
    a, b = socket.socketpair()
    b.close()
    pool = type("P", (), {})()
    pool.lost_states = []
    pool.lost = lambda conn, state: pool.lost_states.append(state)
    conn = SessionConn(Lease(1, "s", "default", 1, a), pool)
    t = _Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    a.close()
    return conn, t, pool


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_retire_prefix_split_before_status_line() -> None:
    conn, _, _ = _conn()
    sink = _Sink()
    assert conn.start(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.data_received(RETIRE_LINE[:3])
    conn.data_received(RETIRE_LINE[3:9])
    conn.data_received(RETIRE_LINE[9:] + OK[:10])
    conn.data_received(OK[10:])
    assert sink.events[0][0] == "head" and sink.events[0][1][0] == 200
    assert ("body", b"ok") in sink.events
    assert sink.events[-1] == ("done", "retired")


def test_not_a_retire_line_fails_the_request() -> None:
    conn, _, _ = _conn()
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.data_received(b"BDREG/1 OOPS\r\n")
    assert sink.events == [("failed", True)]
    assert conn.closed


def test_idle_partial_retire_then_rest() -> None:
    conn, t, pool = _conn()
    conn.data_received(RETIRE_LINE[:4])
    assert pool.lost_states == [] and not t.closing
    conn.data_received(RETIRE_LINE[4:])
    assert pool.lost_states == ["retired"] and t.closing


def test_idle_retire_followed_by_junk_is_broken() -> None:
    conn, _, pool = _conn()
    conn.data_received(RETIRE_LINE + b"x")
    assert pool.lost_states == ["broken"]


def test_head_response_has_no_body_and_session_stays_clean() -> None:
    conn, _, pool = _conn()
    sink = _Sink()
    conn.start(b"HEAD / HTTP/1.1\r\n\r\n", sink, True, False)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    assert sink.events[-1] == ("done", "idle")
    sink2 = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink2, False, False)  # type: ignore[arg-type]
    conn.data_received(OK)
    assert sink2.events[-1] == ("done", "idle") and pool.lost_states == []


def test_head_response_then_retire() -> None:
    conn, _, _ = _conn()
    sink = _Sink()
    conn.start(b"HEAD / HTTP/1.1\r\n\r\n", sink, True, False)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + RETIRE_LINE)
    assert sink.events[-1] == ("done", "retired")


def test_response_followed_by_junk_is_broken_after_delivery() -> None:
    conn, _, _ = _conn()
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.data_received(OK + b"HTTP/1.1 200 OK\r\n")
    assert ("body", b"ok") in sink.events and sink.events[-1] == ("done", "broken")


def test_response_head_limit() -> None:
    conn, _, _ = _conn()
    conn.max_head = 100
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 60)
    conn.data_received(b"a" * 60)
    assert sink.events == [("failed", True)]


def test_response_head_limit_in_one_read() -> None:
    """The whole oversized head in one read: the per-read bound never sees it (issue 12)."""
    conn, _, _ = _conn()
    conn.max_head = 100
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200 + b"\r\nContent-Length: 2\r\n\r\nok")
    assert sink.events == [("failed", True)]  # no head reached the client: 502
    conn, _, _ = _conn()
    conn.max_head = 100
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    # Interim heads count too: endless 1xx cannot grow the head without bound.
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: " + b"l" * 40 + b"\r\n\r\n" * 1)
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: " + b"l" * 40 + b"\r\n\r\n")
    assert sink.events[-1] == ("failed", True)


def test_unrequested_101_fails() -> None:
    conn, _, _ = _conn()
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    )
    assert sink.events[-1] == ("failed", True)
    assert not any(e[0] == "head" for e in sink.events)


def test_close_while_busy_fails_the_request() -> None:
    conn, _, _ = _conn()
    sink = _Sink()
    conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, False, False)  # type: ignore[arg-type]
    conn.close()  # the pool closing the session under a request
    assert sink.events == [("failed", False)]
    assert not conn.start(b"GET / HTTP/1.1\r\n\r\n", _Sink(), False, False)  # type: ignore[arg-type]


def test_closing_an_idle_session_keeps_it_open_for_the_acceptor() -> None:
    """Releasing a lease closes our descriptor only: the acceptor's copy keeps the session."""
    import asyncio
    import os

    import uvloop

    from backdial.sidecar.sessionconn import wrap_lease

    ours, service = socket.socketpair()
    acceptor_copy = socket.socket(fileno=os.dup(ours.fileno()))
    ours.setblocking(False)
    service.settimeout(0.3)

    async def run() -> None:
        conn = await wrap_lease(Lease(1, "s", "default", 1, ours), None)
        conn.close()
        await asyncio.sleep(0.05)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    try:
        with pytest.raises(TimeoutError):
            service.recv(1)  # no end-of-file: the service must not think it was dropped
        acceptor_copy.sendall(b"ping")
        assert service.recv(4) == b"ping"
    finally:
        for s in (service, acceptor_copy):
            s.close()
