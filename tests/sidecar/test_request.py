"""request.py without sockets: validation, smuggling rules, header rewriting."""

from __future__ import annotations

import httptools
import pytest

from backdial.sidecar.request import HttpError, Request, forwarded_node, forwarding_block, xff_line


class _Collect:
    """Feeds one request through httptools into a request.Request, like the proxy does."""

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
    fwd = forwarding_block("192.0.2.7", b"http", b"backdial")
    head = r.build_head(fwd, xff_line([], "192.0.2.7"), "192.0.2.7", trusted=True)
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
    # From a peer that is not a trusted proxy the client's claims are replaced, not appended.
    lines = r.build_head(fwd, xff_line([], "192.0.2.7"), "192.0.2.7").split(b"\r\n")
    assert [ln for ln in lines if ln.lower().startswith((b"x-forwarded-for", b"forwarded"))] == [
        b"Forwarded: for=192.0.2.7;proto=http",
        b"X-Forwarded-For: 192.0.2.7",
    ]


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


def test_forwarded_quotes_ipv6() -> None:
    assert forwarded_node("2001:db8::1") == b'"[2001:db8::1]"'
    assert forwarded_node("192.0.2.1") == b"192.0.2.1"
    assert forwarded_node("") == b"unknown"
