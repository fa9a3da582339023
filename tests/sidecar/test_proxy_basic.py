"""Everyday proxying over leased sessions with real clients (raw sockets, httpx, curl)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Callable

import httpx
import pytest

from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]


def test_get_keepalive_httpx_reuses_one_session(proxy: ProxyRunner) -> None:
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for i in range(5):
            r = client.get(f"/hello?i={i}")
            assert r.status_code == 200
            assert r.json()["target"] == f"/hello?i={i}"
    # Sticky: the same idle session every time, leased once.
    assert len({q.session for q in proxy.backend.requests}) == 1
    assert proxy.pool.states() == ["idle"] * 5
    assert proxy.call(lambda: len(proxy.pool.held)) == 1


FORWARDING = ("x-forwarded-for", "forwarded", "x-real-ip")


def test_forwarding_headers_reach_the_service(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(trusted_proxies=("127.0.0.0/8",))  # the client is a trusted proxy
    c = raw_client(proxy.port)
    c.send(
        b"GET /h HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 203.0.113.9\r\n"
        b"X-Forwarded-Proto: https\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\n\r\n"
    )
    info = c.read_response().json()
    headers = {k.lower(): v for k, v in info["headers"]}
    assert headers["host"] == "shop.example"
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["forwarded"] == "for=127.0.0.1;proto=http"
    assert headers["via"] == "1.1 backdial"
    for hop in ("connection", "x-drop", "keep-alive", "te"):
        assert hop not in headers


def test_untrusted_forwarding_claims_are_replaced(proxy: ProxyRunner, raw_client: Raw) -> None:
    """Issue 12: client-sent X-Forwarded-For was trusted from anyone (appended to)."""
    c = raw_client(proxy.port)
    c.send(
        b"GET /h HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.9\r\n"
        b"Forwarded: for=203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\n\r\n"
    )
    headers = c.read_response().json()["headers"]
    claims = [(k.lower(), v) for k, v in headers if k.lower() in FORWARDING]
    assert sorted(claims) == [
        ("forwarded", "for=127.0.0.1;proto=http"),
        ("x-forwarded-for", "127.0.0.1"),
    ]
    assert proxy.stats.untrusted_forwarding == 1


def test_client_address_behind_trusted_proxies(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    lan = {
        "slices": [
            {"name": "lan", "match": {"cidrs": ["10.0.0.0/8"]}, "share": 50},
            {"name": "default", "share": 50},
        ]
    }
    request = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.1.2.3, 192.0.2.10\r\n\r\n"
    # Trusted: the rightmost address that is not a trusted proxy is the client (10.1.2.3).
    proxy = make_proxy(policy=lan, trusted_proxies=("127.0.0.0/8", "192.0.2.0/24"))
    c = raw_client(proxy.port)
    c.send(request)
    assert c.read_response().status == 200
    assert proxy.pool.acquires == [("", "lan")]
    # Untrusted: a client cannot pick its slice by claiming an address.
    proxy = make_proxy(policy=lan)
    c = raw_client(proxy.port)
    c.send(request)
    assert c.read_response().status == 200
    assert proxy.pool.acquires == [("", "default")]


def test_curl_post_and_chunked_upload(proxy: ProxyRunner) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "-d", "a=1&b=2", f"{proxy.url}/form"],
        capture_output=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["method"] == "POST" and info["body"] == "a=1&b=2"
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "chunked body",
            f"{proxy.url}/up",
        ],
        capture_output=True,
        check=True,
    ).stdout
    info = json.loads(out)
    headers = {k.lower(): v for k, v in info["headers"]}
    # Re-framed: the service sees a Content-Length, never the client's chunking.
    assert info["body"] == "chunked body"
    assert headers["content-length"] == "12" and "transfer-encoding" not in headers


def test_chunked_request_with_trailers_drops_them(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(
        b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    info = c.read_response().json()
    assert info["body"] == "hello world"
    assert "X-Checksum" not in proxy.backend.raw_bytes.decode()


def test_chunked_response_and_trailers(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.header("transfer-encoding") == "chunked"
    assert r.body == b"hello chunked world"
    assert b"X-Trailer" not in r.raw_head
    # HTTP/1.0 client: de-chunked, close-delimited.
    c = raw_client(proxy.port)
    c.send(b"GET /chunked HTTP/1.0\r\n\r\n")
    r = c.read_response()
    assert r.header("transfer-encoding") is None and r.body == b"hello chunked world"
    assert r.header("connection") == "close"


def test_close_delimited_response_rechunked(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /eof HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.body == b"until the end" and r.header("transfer-encoding") == "chunked"
    c.send(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")  # the client connection lives on
    assert c.read_response().status == 200
    assert proxy.pool.states()[0] == "broken"  # the session ended with the response


def test_head_204_304_have_no_body(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"HEAD /big?n=5000 HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response(head_only=True)
    assert r.status == 200 and r.header("content-length") == "5000"
    for path, code in (("/status/204", 204), ("/status/304", 304)):
        c.send(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert c.read_response().status == code
    c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.json()["target"] == "/after"
    assert c.buf == b""
    assert len({q.session for q in proxy.backend.requests}) == 1
    assert set(proxy.pool.states()) == {"idle"}


def test_http10_client(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /one HTTP/1.0\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert c.closed()
    c = raw_client(proxy.port)
    c.send(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = c.read_response()
    assert r.header("connection") == "keep-alive"
    c.send(b"GET /two HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert c.read_response().json()["target"] == "/two"
    # The session always speaks HTTP/1.1 with a Host, whatever the client spoke.
    assert b"GET /two HTTP/1.1\r\nHost: \r\n" in proxy.backend.raw_bytes


def test_connection_close_from_client(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert c.closed()
    assert proxy.pool.states() == ["idle"]  # the session is fine: it goes back clean


def test_pipelining_answers_in_order(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(
        b"GET /sleep?s=0.2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /p2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"HEAD /big?n=10 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /p4 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert c.read_response().json()["target"] == "/sleep?s=0.2"
    r2 = c.read_response().json()
    assert r2["target"] == "/p2" and r2["body"] == "abc"
    r3 = c.read_response(head_only=True)
    assert r3.header("content-length") == "10"
    assert c.read_response().json()["target"] == "/p4"
    assert len({q.session for q in proxy.backend.requests}) == 1  # one at a time, one session


def test_expect_100_continue(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = c.read_response()
    assert interim.status == 100
    assert proxy.pool.acquires == []  # nothing leased before the body is here
    c.send(b"hello")
    r = c.read_response()
    assert r.json()["body"] == "hello"
    assert b"expect" not in proxy.backend.raw_bytes.lower()


def test_expect_100_continue_with_curl(proxy: ProxyRunner) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    body = "x" * 5000
    res = subprocess.run(
        [
            "curl",
            "-sS",
            "-v",
            "--max-time",
            "5",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            body,
            f"{proxy.url}/big-upload",
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    assert "HTTP/1.1 100 Continue" in res.stderr
    assert json.loads(res.stdout)["body"] == body


def test_early_hints_forwarded(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /early-hints HTTP/1.1\r\nHost: a\r\n\r\n")
    hint = c.read_response()
    assert hint.status == 103 and hint.header("link") == "</s.css>; rel=preload"
    final = c.read_response()
    assert final.status == 200 and final.body == b"hinted"


def test_response_hop_by_hop_removed(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /hop HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.body == b"hop"
    assert r.header("x-secret") is None and r.header("keep-alive") is None
    assert r.header("connection") is None


def test_absolute_form_and_options_star(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET http://shop.example/abs?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    info = c.read_response().json()
    assert info["target"] == "/abs?q=1"
    assert dict((k.lower(), v) for k, v in info["headers"])["host"] == "shop.example"
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().json()["target"] == "*"


def test_h2c_upgrade_is_ignored(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(
        b"GET /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert c.read_response().json()["target"] == "/u"
    assert c.read_response().json()["target"] == "/next"
    assert b"h2c" not in proxy.backend.raw_bytes


def test_routing_and_slices_reach_the_pool(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(
        policy={
            "slices": [
                {"name": "mobile", "match": {"userAgent": "iPhone"}, "share": 30},
                {
                    "name": "local",
                    "match": {"cidrs": ["127.0.0.0/8"], "pathPrefixes": ["/local"]},
                    "share": 30,
                },
                {"name": "default", "share": 40},
            ],
            "routes": [
                {"name": "api", "service": "api", "host": "api.example", "pathPrefix": "/v1"}
            ],
            "defaultService": "web",
        },
        pool={"services": ["api", "web"], "sessions": 2},
    )
    c = raw_client(proxy.port)
    for req in (
        b"GET /v1/x HTTP/1.1\r\nHost: API.example:8080\r\nUser-Agent: Mozilla iPhone\r\n\r\n",
        b"GET /local/x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nHost: b\r\n\r\n",
    ):
        c.send(req)
        assert c.read_response().status == 200
    assert proxy.pool.acquires == [("api", "mobile"), ("web", "local"), ("web", "default")]
    served = [(q.target, q.session) for q in proxy.backend.requests]
    assert proxy.call(lambda: proxy.acceptor.ledger.sessions[served[0][1]].service) == "api"
    assert proxy.call(lambda: proxy.acceptor.ledger.sessions[served[1][1]].service) == "web"


def test_half_close_after_pipelined_requests(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(
        b"GET /sleep?s=0.1 HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /cut-by-fin HTTP/1.1\r\nHo"
    )
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read_response().status == 200
    assert c.read_response().json()["target"] == "/second"
    assert c.closed()
    assert b"cut-by-fin" not in proxy.backend.raw_bytes
