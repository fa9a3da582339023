"""Request smuggling defences end to end: the service must receive nothing of a bad request."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"

CASES = [
    (
        "cl+te",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te+cl",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "dup-cl",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n"
        + SMUGGLED,
        400,
    ),
    ("cl-list", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 40\r\n\r\n" + SMUGGLED, 400),
    ("cl-sign", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n" + SMUGGLED, 400),
    (
        "te-gzip-chunked",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        501,
    ),
    (
        "te-identity",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n" + SMUGGLED,
        501,
    ),
    (
        "te-space",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    ("te-10", b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    (
        "obs-fold",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n" + SMUGGLED,
        400,
    ),
    ("bare-lf", b"GET /x HTTP/1.1\nHost: a\n\n" + SMUGGLED, 400),
    ("bare-lf-mid", b"GET /x HTTP/1.1\r\nHost: a\nContent-Length: 5\r\n\r\n" + SMUGGLED, 400),
    ("bare-cr", b"GET /x HTTP/1.1\r\nHost: a\rContent-Length: 5\r\n\r\n" + SMUGGLED, 400),
    ("bad-name", b"GET /x HTTP/1.1\r\nHost: a\r\nX[1]: v\r\n\r\n" + SMUGGLED, 400),
    ("ctl-value", b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n" + SMUGGLED, 400),
    ("no-host", b"GET /x HTTP/1.1\r\n\r\n" + SMUGGLED, 400),
    ("two-hosts", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + SMUGGLED, 400),
    (
        "bad-chunk-size",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5x\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "chunk-bare-lf",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\nhello\n0\n\n" + SMUGGLED,
        400,
    ),
    ("http09", b"GET /x\r\n\r\n" + SMUGGLED, 505),
    ("connect", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n" + SMUGGLED, 501),
]


@pytest.mark.parametrize(("name", "raw", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_never_reaches_the_service(
    proxy: ProxyRunner, raw_client: Raw, name: str, raw: bytes, status: int
) -> None:
    c = raw_client(proxy.port)
    c.send(raw)
    r = c.read_response()
    assert r.status == status, (name, r)
    assert r.header("connection") == "close"
    assert c.closed()
    assert proxy.backend.raw_bytes == b""
    assert proxy.pool.acquires == []


def test_pipelined_good_then_bad(proxy: ProxyRunner, raw_client: Raw) -> None:
    """The good request is served, the bad one answered 400 in order, the rest never read."""
    c = raw_client(proxy.port)
    c.send(
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED
    )
    assert c.read_response().json()["target"] == "/first"
    assert c.read_response().status == 400
    assert c.closed()
    raw = proxy.backend.raw_bytes
    assert raw.count(b"HTTP/1.1\r\n") == 1 and b"/admin" not in raw


def test_bad_request_after_slow_first_waits_its_turn(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
    assert c.read_response().status == 200
    assert c.read_response().status == 400


def test_head_too_large_is_431(make_proxy: Callable[..., ProxyRunner], raw_client: Raw) -> None:
    proxy = make_proxy(max_header_bytes=4096)
    c = raw_client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 5000 + b"\r\n\r\n")
    assert c.read_response().status == 431
    assert c.closed()
    # Dribbled over many reads without ever ending the field: still bounded.
    c = raw_client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    for _ in range(40):
        try:
            c.send(b"v" * 200)
        except OSError:
            break
        time.sleep(0.005)
    assert c.read_response().status == 431
    # A long request line too.
    c = raw_client(proxy.port)
    c.send(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 431
    assert proxy.backend.raw_bytes == b""


@pytest.mark.parametrize("split", [None, 5], ids=["one-read", "size-split"])
def test_oversized_chunk_is_refused_up_front(
    proxy: ProxyRunner, raw_client: Raw, split: int | None
) -> None:
    """Issue 12: a chunk size of 7FFFFFFFFFFFFFFF was accepted and read up to the body limit."""
    c = raw_client(proxy.port)
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    line = b"7FFFFFFFFFFFFFFF\r\n"
    if split is None:
        c.send(head + line + b"only a few bytes")
    else:
        c.send(head + line[:split])
        c.send(line[split:] + b"x")
    r = c.read_response()
    assert r.status == 413 and r.header("connection") == "close"
    assert c.closed()
    assert proxy.backend.raw_bytes == b"" and proxy.pool.acquires == []
    assert proxy.stats.chunk_refusals == 1


def test_chunked_request_pipelined_after_a_sized_one(proxy: ProxyRunner, raw_client: Raw) -> None:
    """The framing is followed across requests in one read: the second is judged too."""
    c = raw_client(proxy.port)
    c.send(
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd"
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n7FFFFFFFFFFFFFFF\r\n"
    )
    assert c.read_response().status == 200
    assert c.read_response().status == 413
    assert proxy.stats.chunk_refusals == 1
