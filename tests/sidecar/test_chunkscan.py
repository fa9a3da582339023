"""chunkscan.py: chunk sizes judged as they arrive, and where a chunked body ends."""

from __future__ import annotations

import pytest

from backdial.sidecar.chunkscan import ChunkScan

BODY = b"3\r\nabc\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"


def test_finds_the_end_of_a_body_in_any_split() -> None:
    nxt = b"GET / HTTP/1.1\r\n"
    for cut in range(len(BODY) + 1):
        scan = ChunkScan(100)
        first = scan.feed(BODY[:cut])
        assert (first == cut and not scan.done) or cut == len(BODY)
        second = scan.feed(BODY[cut:] + nxt)
        assert scan.done and cut + second == len(BODY), cut


@pytest.mark.parametrize(
    "size", [b"7FFFFFFFFFFFFFFF", b"65", b"FFFFFFFFFFFFFFFFFFFF"], ids=["2^63-1", "101", "huge"]
)
def test_a_size_over_the_limit_is_refused_at_its_digits(size: bytes) -> None:
    scan = ChunkScan(100)
    assert scan.feed(size[:1]) in (1, ChunkScan.TOO_LARGE)
    assert scan.feed(size[1:]) == ChunkScan.TOO_LARGE  # before its line even ends


def test_the_limit_counts_every_chunk() -> None:
    scan = ChunkScan(10)
    assert scan.feed(b"6\r\nabcdef\r\n") == 11
    assert scan.feed(b"5\r\n") == ChunkScan.TOO_LARGE  # 6 + 5 > 10
    scan = ChunkScan(10)
    whole = b"6\r\nabcdef\r\n4\r\nabcd\r\n0\r\n\r\n"
    assert scan.feed(whole + b"GET") == len(whole) and scan.done


def test_framing_llhttp_refuses_stops_the_judging() -> None:
    scan = ChunkScan(10)
    assert scan.feed(b"3 \r\nabc") == 7 and not scan.judging  # llhttp answers 400 itself
