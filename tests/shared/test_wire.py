"""The registration protocol's lines without sockets: preambles, replies, refusals."""

from __future__ import annotations

import pytest

from backdial import wire
from backdial.wire import ErrCode, Preamble, PreambleError


def test_preamble_round_trip() -> None:
    pre = Preamble("shop", "pod-1", "mobile", "t0k3n")
    line = pre.encode()
    assert line == b"BDREG/1 service=shop instance=pod-1 slice=mobile token=t0k3n\r\n"
    assert wire.find_line(line + b"GET") == len(line)
    assert wire.parse_preamble(line) == pre


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"BDREG/2 service=a instance=b\r\n", ErrCode.VERSION),
        (b"HELLO service=a instance=b\r\n", ErrCode.MALFORMED),
        (b"BDREG/1 service=a\r\n", ErrCode.MALFORMED),  # instance missing
        (b"BDREG/1 service=a instance=b service=c\r\n", ErrCode.MALFORMED),
        (b"BDREG/1 service=a instance=b color=red\r\n", ErrCode.MALFORMED),
        (b"BDREG/1 service=a instance=b/c\r\n", ErrCode.MALFORMED),
        (b"BDREG/1 service=a  instance=b\r\n", ErrCode.MALFORMED),  # two spaces
        (b"BDREG/1 service=a instance=b\n", ErrCode.MALFORMED),
        (b"BDREG/1 service=a instance=" + b"x" * 1100 + b"\r\n", ErrCode.TOO_LONG),
    ],
)
def test_bad_preambles(line: bytes, code: ErrCode) -> None:
    with pytest.raises(PreambleError) as info:
        wire.parse_preamble(line)
    assert info.value.code is code


def test_extension_keys_are_ignored() -> None:
    assert wire.parse_preamble(b"BDREG/1 x-zone=a service=s instance=i\r\n") == Preamble("s", "i")


def test_find_line_limits() -> None:
    assert wire.find_line(b"BDREG/1 service=a") == -1
    with pytest.raises(PreambleError) as info:
        wire.find_line(b"x" * wire.MAX_PREAMBLE)
    assert info.value.code is ErrCode.TOO_LONG
    with pytest.raises(PreambleError) as info:
        wire.find_line(b"BDREG/1\n")
    assert info.value.code is ErrCode.MALFORMED


def test_encode_refuses_bad_values() -> None:
    with pytest.raises(ValueError):
        Preamble("a b", "i").encode()
    with pytest.raises(ValueError):
        Preamble("s", "é").encode()


def test_replies() -> None:
    ok = wire.parse_reply(wire.encode_ok(7, 3))
    assert ok == wire.Reply(True, session=7, registrant=3)
    err = wire.parse_reply(wire.encode_err(ErrCode.LIMIT, "full\r\nup"))
    assert not err.ok and err.code is ErrCode.LIMIT and err.message == "full  up"
    # A code from a newer acceptor: not refused, kept in the message, no ErrCode.
    later = wire.parse_reply(b"BDREG/1 ERR quota over budget\r\n")
    assert not later.ok and later.code is None and later.message == "quota: over budget"
    for bad in (b"BDREG/1 MAYBE\r\n", b"HTTP/1.1 200 OK\r\n", b"BDREG/1 OK session=1"):
        with pytest.raises(ValueError):
            wire.parse_reply(bad)
