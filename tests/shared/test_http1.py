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
