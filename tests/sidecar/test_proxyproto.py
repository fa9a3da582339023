"""PROXY protocol v1/v2 parsing: strict, incremental, bounded."""

from __future__ import annotations

import struct

import pytest

from backdial.sidecar import proxyproto
from backdial.sidecar.proxyproto import ProxyHeaderError, parse
from tests.sidecar import proxyheaders


def test_v1_tcp4_and_tcp6() -> None:
    raw = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /"
    h = parse(raw)
    assert h is not None and h.client == ("192.0.2.1", 56324) and raw[h.length :] == b"GET /"
    h = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
    assert h is not None and h.client == ("2001:db8::1", 1)
    h = parse(b"PROXY UNKNOWN whatever\r\n")
    assert h is not None and h.client is None


def test_v1_incremental() -> None:
    raw = proxyheaders.encode_v1(("192.0.2.1", 5), ("192.0.2.2", 80))
    for i in range(len(raw)):
        assert parse(raw[:i]) is None
    assert parse(raw) is not None


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
        b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 120,
        b"PROXX",
    ],
)
def test_v1_malformed(raw: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(raw)


def test_v2_tcp4_tcp6_local() -> None:
    raw = proxyheaders.encode_v2(("192.0.2.9", 4000), ("192.0.2.10", 80), tlvs=b"\x04\x00\x01x")
    h = parse(raw + b"rest")
    assert h is not None and h.client == ("192.0.2.9", 4000) and h.length == len(raw)
    raw6 = proxyheaders.encode_v2(("2001:db8::9", 4001), ("2001:db8::a", 80))
    h = parse(raw6)
    assert h is not None and h.client == ("2001:db8::9", 4001)
    local = proxyproto.V2_SIG + struct.pack("!BBH", 0x20, 0x00, 0)
    h = parse(local)
    assert h is not None and h.client is None and h.length == 16
    for i in range(len(raw)):
        assert parse(raw[:i]) is None


@pytest.mark.parametrize(
    "raw",
    [
        proxyproto.V2_SIG[:-1] + b"X",
        proxyproto.V2_SIG + struct.pack("!BBH", 0x11, 0x11, 12),  # version 1
        proxyproto.V2_SIG + struct.pack("!BBH", 0x22, 0x11, 12),  # command 2
        proxyproto.V2_SIG + struct.pack("!BBH", 0x21, 0x41, 12),  # family 4
        proxyproto.V2_SIG + struct.pack("!BBH", 0x21, 0x11, 4),  # too short for IPv4
        proxyproto.V2_SIG + struct.pack("!BBH", 0x21, 0x11, 60000),  # over the size limit
    ],
)
def test_v2_malformed(raw: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(raw)
