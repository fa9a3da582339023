"""http1.py without sockets: validation, smuggling rules, rewriting, canned responses."""

from __future__ import annotations

import httptools
import pytest

from backdial.sidecar import http1
from backdial.sidecar.http1 import HttpError, Request


class _Collect:
    """Feeds one request through httptools into an http1.Request, like the proxy does."""

    def __init__(self, limit: int = 65536, max_body: int = 1 << 20) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.r = Request(frozenset({b"x-tier"}), limit)
        self.max_body = max_body
        self.host = b""

    def on_url(self, url: bytes) -> None:
        self.r.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.r.add_header(name, value)

    def on_headers_complete(self) -> None:
        p = self.parser
        self.host = self.r.check_head(
            p.get_http_version(),
            p.get_method(),
            p.should_keep_alive(),
            p.should_upgrade(),
            self.max_body,
        )


def parse(raw: bytes, **kw: int) -> _Collect:
    c = _Collect(**kw)
    try:
        c.parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        if isinstance(exc.__context__, HttpError):
            raise exc.__context__ from None
        raise
    return c


def status_of(raw: bytes, **kw: int) -> int:
    try:
        parse(raw, **kw)
    except HttpError as exc:
        return exc.status
    except httptools.HttpParserError:
        return 400
    return 200


def test_parser_is_strict() -> None:
    assert http1.PARSER_STRICT
    http1.require_strict_parser()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n", 400),  # bare LF inside the head
        (b"GET / HTTP/1.1\r\nHost: a\rX: 1\r\n\r\n", 400),  # bare CR
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),  # whitespace before the first field
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # space before colon
        (b"GET / HTTP/1.1\r\nHo(st: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host on 1.1
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 505),  # HTTP/0.9
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
        (b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET http://user@evil/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx", 417),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"GET / HTTP/1.0\r\n\r\n", 200),  # Host is optional in 1.0
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"GET http://a.example:81/p?q HTTP/1.1\r\nHost: ignored\r\n\r\n", 200),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", 200),
    ],
)
def test_request_rules(raw: bytes, status: int) -> None:
    assert status_of(raw, max_body=1 << 20) == status


def test_head_size_limit_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 200 + b"\r\n\r\n"
    assert status_of(raw, limit=100) == 431


def test_rewrite_removes_hop_by_hop_and_adds_forwarding() -> None:
    c = parse(
        b"POST /p?q=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Trailer: X-T\r\nProxy-Authorization: Basic x\r\nUpgrade: h2c\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\n"
        b"Forwarded: for=10.0.0.1\r\nVia: 1.0 edge\r\nX-Tier: gold\r\nContent-Length: 3\r\n\r\nabc"
    )
    r = c.r
    assert c.host == b"example.com"
    r.body_len = 3
    fwd = http1.forwarding_block("192.0.2.7", b"http", b"backdial")
    head = r.build_head(fwd, http1.xff_line([], "192.0.2.7"), "192.0.2.7")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /p?q=1 HTTP/1.1"
    names = [ln.split(b":")[0].lower() for ln in lines[1:] if ln]
    for hop in (
        b"connection",
        b"x-secret",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"upgrade",
        b"x-forwarded-proto",
    ):
        assert names.count(hop) == (1 if hop == b"x-forwarded-proto" else 0), hop
    assert b"Host: Example.COM:8080" in lines
    assert b"X-Forwarded-For: 10.0.0.1, 10.0.0.2, 192.0.2.7" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"Forwarded: for=10.0.0.1" in lines and b"Forwarded: for=192.0.2.7;proto=http" in lines
    assert b"Via: 1.0 edge" in lines and b"Via: 1.1 backdial" in lines
    assert b"Content-Length: 3" in lines
    assert r.hv == {b"x-tier": b"gold"}
    assert head.endswith(b"\r\n\r\n")


def test_absolute_form_becomes_origin_form_with_its_host() -> None:
    c = parse(b"GET http://a.example:81/p?q HTTP/1.1\r\nHost: ignored\r\n\r\n")
    head = c.r.build_head(b"", b"", "")
    assert head.startswith(b"GET /p?q HTTP/1.1\r\nHost: a.example:81\r\n")
    assert b"ignored" not in head
    assert c.host == b"a.example"


def test_chunked_request_is_reframed_with_content_length() -> None:
    c = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.r.body_len = 11
    head = c.r.build_head(b"", b"", "")
    assert b"Content-Length: 11\r\n" in head and b"Transfer-Encoding" not in head
    c.r.streaming = True
    assert b"Transfer-Encoding: chunked\r\n" in c.r.build_head(b"", b"", "")


def test_expect_continue_and_idempotency() -> None:
    c = parse(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert c.r.expect_continue and c.r.idempotent
    assert b"Expect" not in c.r.build_head(b"", b"", "")
    c = parse(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert not c.r.expect_continue and not c.r.idempotent  # 1.0: the expectation is ignored


def test_websocket_upgrade_is_kept_other_upgrades_dropped() -> None:
    c = parse(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\n"
    )
    assert c.r.upgrade
    head = c.r.build_head(b"", b"", "")
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in head
    c = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n"
    )
    assert not c.r.upgrade
    head = c.r.build_head(b"", b"", "")
    assert b"Upgrade" not in head and b"HTTP2-Settings" not in head


def test_keep_alive_flags() -> None:
    assert not parse(b"GET / HTTP/1.0\r\n\r\n").r.keep_alive
    assert parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").r.keep_alive
    assert not parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").r.keep_alive


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


def test_forwarded_quotes_ipv6() -> None:
    assert http1.forwarded_node("2001:db8::1") == b'"[2001:db8::1]"'
    assert http1.forwarded_node("192.0.2.1") == b"192.0.2.1"
    assert http1.forwarded_node("") == b"unknown"


def test_canned_responses() -> None:
    for status in (400, 408, 413, 431, 501, 505):
        data = getattr(http1, f"RESP_{status}")
        assert data.startswith(b"HTTP/1.1 %d " % status)
        assert b"\r\nConnection: close\r\n" in data
        head, body = data.split(b"\r\n\r\n")
        assert b"Content-Length: %d\r\n" % len(body) in head + b"\r\n"
    assert b"Connection" not in http1.RESP_502 and b"Connection" not in http1.RESP_504
    assert b"Retry-After: 1\r\n" in http1.RESP_503
    assert b"Retry-After: 7\r\n" in http1.canned(503, http1.KEEP, retry_after=7)
    assert http1.canned(503, http1.KEEP_10, True).endswith(b"Connection: keep-alive\r\n\r\n")
    assert http1.canned(502, http1.KEEP) is http1.canned(502, http1.KEEP)


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
