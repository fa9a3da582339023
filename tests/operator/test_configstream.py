"""The config stream protocol: messages and the upgrade handshake, both ends."""

from __future__ import annotations

import pytest

from backdial import configstream as cs


def test_messages_round_trip() -> None:
    msgs: list[cs.Message] = [
        cs.Hello(3, "abc", "shop/web", 42),
        cs.Config(3, "abc", "shop/web", {"slices": [], "limits": {"maxSessions": 3}}),
        cs.Config(4, "", "shop/web", None),
        cs.Ack(3, "abc"),
        cs.Ack(3, "abc", ok=False, error="bad"),
        cs.Report(4, 1, 2, 3, {"default": {"leased": 1, "waiting": 2}}),
        cs.Ping(),
    ]
    for msg in msgs:
        line = cs.encode(msg)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert cs.decode(line) == msg


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"nope\n", "not JSON"),
        (b"[1]\n", "JSON object"),
        (b'{"type": "shout"}\n', "unknown"),
        (b'{"generation": 1}\n', "unknown"),
        (b'{"type": "ack", "generation": "1", "version": "v"}\n', "generation must be int"),
        (b'{"type": "ack", "generation": true, "version": "v"}\n', "generation must be int"),
        (b'{"type": "ack", "version": "v"}\n', "missing"),
        (b'{"type": "report", "slices": {"a": {"leased": "x"}}}\n', "integers"),
        (
            b'{"type": "config", "generation": 1, "version": "v", "owner": "o", "policy": 3}\n',
            "policy",
        ),
    ],
)
def test_bad_messages_are_refused(line: bytes, why: str) -> None:
    with pytest.raises(cs.StreamError, match=why):
        cs.decode(line)


def test_unknown_fields_are_ignored() -> None:
    assert cs.decode(b'{"type": "ping", "future": 1}\n') == cs.Ping()


def test_request_and_response_heads() -> None:
    head = cs.encode_request("op:8444", "shop", "web-0", "tok.en.x")
    req = cs.parse_request(head)
    assert (req.method, req.target) == ("GET", "/v1/namespaces/shop/pods/web-0/config")
    assert cs.wants_upgrade(req) and cs.bearer_token(req) == "tok.en.x"
    assert cs.parse_path(req.target) == ("shop", "web-0")
    for bad in ("/v1/namespaces/Shop/pods/x/config", "/v1/namespaces/a/pods/x", "/x"):
        assert cs.parse_path(bad) is None
    with pytest.raises(ValueError, match="one non-empty line"):
        cs.encode_request("h", "ns", "p", "a\r\nInjected: 1")
    status, headers = cs.parse_response(cs.encode_response(101))
    assert status == 101 and headers["upgrade"] == cs.PROTOCOL
    raw = cs.encode_response(403, "not your pod")
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = cs.parse_response(head + b"\r\n\r\n")
    assert status == 403 and int(headers["content-length"]) == len(body)
    assert cs.error_message(body) == "not your pod"
    assert b"WWW-Authenticate" in cs.encode_response(401)


def test_bad_heads() -> None:
    with pytest.raises(cs.StreamError):
        cs.parse_request(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(cs.StreamError):
        cs.parse_request(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")
    with pytest.raises(cs.StreamError, match="too large"):
        cs.parse_request(b"GET / HTTP/1.1\r\nX: " + b"a" * cs.MAX_HEAD + b"\r\n\r\n")
    with pytest.raises(cs.StreamError, match="another protocol"):
        cs.parse_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    req = cs.parse_request(b"GET / HTTP/1.1\r\nAuthorization: Basic x\r\n\r\n")
    assert cs.bearer_token(req) is None and not cs.wants_upgrade(req)


def test_report_pacing() -> None:
    pacer = cs.ReportPacer(interval=1.0, keepalive=10.0)
    a, b = cs.Report(registered=1), cs.Report(registered=2)
    assert pacer.due(a, 0.0)
    assert not pacer.due(a, 0.5)  # unchanged
    assert not pacer.due(b, 0.5)  # changed, but within the interval
    assert pacer.due(b, 1.0)
    assert not pacer.due(b, 9.0)
    assert pacer.due(b, 11.0)  # keepalive
