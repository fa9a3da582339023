"""The shared HTTP/1.1 toolkit (backdial.http1) without sockets."""

from __future__ import annotations

import pytest

from backdial import http1
from backdial.http1 import ConnMode


def test_parser_is_strict() -> None:
    assert http1.PARSER_STRICT
    http1.require_strict_parser()


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (b"Example.com", b"example.com"),
        (b"example.com:8080", b"example.com"),
        (b"[::1]:8080", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"", b""),
        (b"a b", None),
        (b"a@b", None),
        (b"[::1", None),
        (b"[::1]x", None),
        (b"a:b", None),
    ],
)
def test_host_key(value: bytes, key: bytes | None) -> None:
    assert http1.host_key(value) == key


def test_split_target() -> None:
    assert http1.split_target(b"/a?b") == (None, b"/a?b")
    assert http1.split_target(b"http://h:1/x") == (b"h:1", b"/x")
    assert http1.split_target(b"HTTPS://h?q") == (b"h", b"/?q")
    assert http1.split_target(b"ftp://h/") is None
    assert http1.split_target(b"http:///x") is None


def test_canned_responses() -> None:
    for status in (400, 408, 413, 431, 501, 505):
        data = http1.canned(status, ConnMode.CLOSE)
        assert data.startswith(b"HTTP/1.1 %d " % status)
        assert b"\r\nConnection: close\r\n" in data
        head, body = data.split(b"\r\n\r\n")
        assert b"Content-Length: %d\r\n" % len(body) in head + b"\r\n"
    assert data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert http1.canned(413, ConnMode.CLOSE).startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection" not in http1.canned(502, ConnMode.KEEP)
    assert b"Retry-After: 7\r\n" in http1.canned(503, ConnMode.KEEP, retry_after=7)
    assert b"Retry-After" not in http1.canned(503, ConnMode.KEEP)
    assert http1.canned(503, ConnMode.KEEP_10, True).endswith(b"Connection: keep-alive\r\n\r\n")
    assert http1.canned(502, ConnMode.KEEP) is http1.canned(502, ConnMode.KEEP)


def test_chunk_framing() -> None:
    assert http1.chunk(b"hello") == b"5\r\nhello\r\n"
    assert http1.chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert http1.LAST_CHUNK == b"0\r\n\r\n"


def test_connection_tokens_and_drop_named() -> None:
    assert http1.connection_tokens([b"Keep-Alive, X-A", b" x-b ,"]) == {
        b"keep-alive",
        b"x-a",
        b"x-b",
    }
    lines = [b"X-A: 1\r\n", b"Y: 2\r\n", b"x-b: 3\r\n"]
    assert http1.drop_named(lines, {b"x-a", b"x-b"}) == [b"Y: 2\r\n"]


def test_status_line_cache() -> None:
    assert http1.cached_status_line(299, b"Fine") == b"HTTP/1.1 299 Fine\r\n"
    assert http1.cached_status_line(299, b"Other") == b"HTTP/1.1 299 Other\r\n"
    assert http1.cached_status_line(299, b"Fine") == b"HTTP/1.1 299 Fine\r\n"


def test_status_lines() -> None:
    assert http1.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert http1.status_line(200) is http1.status_line(200)  # precomputed
    assert http1.status_line(299) == b"HTTP/1.1 299 \r\n"
    assert http1.status_line(299, b"Fine") == b"HTTP/1.1 299 Fine\r\n"
    with pytest.raises(ValueError):
        http1.status_line(99)


@pytest.mark.parametrize(
    ("status", "head_only", "length", "http10", "mode"),
    [
        (200, False, 5, False, http1.BodyMode.LENGTH),
        (200, False, 5, True, http1.BodyMode.LENGTH),
        (200, False, -1, False, http1.BodyMode.CHUNK),
        (200, False, -1, True, http1.BodyMode.EOF),
        (200, True, -1, True, http1.BodyMode.NONE),
        (204, False, 5, False, http1.BodyMode.NONE),
        (304, False, -1, False, http1.BodyMode.NONE),
        (103, False, -1, False, http1.BodyMode.NONE),
        (101, False, -1, False, http1.BodyMode.TUNNEL),
    ],
)
def test_body_mode(status: int, head_only: bool, length: int, http10: bool, mode: int) -> None:
    assert http1.body_mode(status, head_only, length, http10) == mode


def test_connection_modes() -> None:
    assert http1.conn_mode(False, False) == ConnMode.CLOSE
    assert http1.conn_mode(False, True) == ConnMode.CLOSE
    assert http1.conn_mode(True, False) == ConnMode.KEEP
    assert http1.conn_mode(True, True) == ConnMode.KEEP_10
    assert http1.CONNECTION_LINE[ConnMode.KEEP] == b""


def test_field_rules() -> None:
    assert http1.field_ok(b"X-Ok", b"any value, with; punctuation")
    assert not http1.field_ok(b"bad name", b"v")
    assert not http1.field_ok(b"x", b"a\r\nset-cookie: b")
    assert not http1.field_ok(b"x", b"a\x00b")
    assert http1.expects_continue(b" 100-Continue ")
    assert not http1.expects_continue(b"100-continue, x")
    assert {b"connection", b"transfer-encoding", b"upgrade", b"te", b"keep-alive"} <= (
        http1.HOP_BY_HOP
    )
    assert b"host" not in http1.HOP_BY_HOP and b"expect" not in http1.HOP_BY_HOP
    assert http1.transfer_coding_ok([b" Chunked"]) and not http1.transfer_coding_ok([b"gzip"])
    assert http1.path_of(b"/a/b?c=d") == b"/a/b" and http1.path_of(b"/x") == b"/x"


def test_parse_head_requests_and_responses() -> None:
    req = http1.parse_head(
        b"GET /p?q HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nUpgrade: y\r\n"
        b"Connection: Upgrade\r\n\r\n"
    )
    assert (req.method, req.target, req.version) == ("GET", "/p?q", "1.1")
    assert req.header("X-A") == "1, 2" and req.fields["host"] == "a"
    resp = http1.parse_head(b"HTTP/1.1 101 Switching\r\nUpgrade: y\r\n\r\n", response=True)
    assert resp.status == 101 and resp.header("upgrade") == "y"
    for bad in (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"GET / HTTP/1.1\nHost: a\n\n"):
        with pytest.raises(http1.HeadError):
            http1.parse_head(bad)
    with pytest.raises(http1.HeadError, match="incomplete"):
        http1.parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n")
