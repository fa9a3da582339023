"""Chunk sizes of a request body read as they arrive, so a huge one is refused up front.

httptools reports chunk data but not the size a chunk declared, so a client
announcing ``7FFFFFFFFFFFFFFF`` would be accepted and read until the body limit
(``max_request_body_stream``) ran out.  ``ChunkScan`` follows the chunked
framing of one body byte by byte alongside llhttp (which still validates it)
and answers, per read, either "too large" as soon as a size line declares more
than the body may still hold, or where in the read the body ended (the rest is
the next pipelined request).  Framing it cannot follow (anything llhttp would
refuse anyway) makes it stop judging; llhttp then answers 400.

The proxy starts a scan when a chunked request's head ends inside a read it
split at the head's ``CRLF CRLF`` (``clientread.RequestReader._parse_framed``).
Pure state machine; no IO.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

_HEX: Final = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class _S(IntEnum):
    SIZE = 0  # hex digits of a chunk size
    EXT = 1  # chunk extension, up to CR
    SIZE_LF = 2  # LF after the size line's CR
    DATA = 3  # chunk data
    DATA_CR = 4  # CR after the data
    DATA_LF = 5  # LF after the data
    TRAILER_START = 6  # a trailer line, or the final CRLF
    TRAILER = 7  # inside a trailer line, up to LF
    END_LF = 8  # LF of the final CRLF
    DONE = 9
    LOST = 10  # framing llhttp will refuse: stop judging


class ChunkScan:
    """Follows one chunked body; ``feed`` returns -1 (too large) or bytes of the body."""

    __slots__ = ("declared", "limit", "remaining", "size", "state")

    TOO_LARGE: Final = -1

    def __init__(self, limit: int) -> None:
        self.limit = limit  # body bytes allowed in all
        self.declared = 0  # sum of the sizes declared so far
        self.state = _S.SIZE
        self.size = 0
        self.remaining = 0

    @property
    def done(self) -> bool:
        return self.state == _S.DONE

    @property
    def judging(self) -> bool:
        return self.state not in (_S.DONE, _S.LOST)

    def feed(self, data: bytes) -> int:
        """Scan *data*: -1 when a size goes over the limit, else how many of its bytes
        belong to this body (``len(data)`` unless the body ended inside it)."""
        if self.state == _S.DONE:
            return 0
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state == _S.DATA:
                step = min(self.remaining, n - i)
                self.remaining -= step
                i += step
                if not self.remaining:
                    self.state = _S.DATA_CR
                continue
            c = data[i]
            i += 1
            if state == _S.SIZE:
                digit = _HEX.get(c)
                if digit is not None:
                    self.size = self.size * 16 + digit
                    if self.declared + self.size > self.limit:
                        return self.TOO_LARGE
                elif c == 0x3B:  # ';'
                    self.state = _S.EXT
                elif c == 0x0D:
                    self.state = _S.SIZE_LF
                else:
                    self.state = _S.LOST
            elif state == _S.EXT:
                if c == 0x0D:
                    self.state = _S.SIZE_LF
            elif state == _S.SIZE_LF:
                if c != 0x0A:
                    self.state = _S.LOST
                elif self.size == 0:
                    self.state = _S.TRAILER_START
                else:
                    self.declared += self.size
                    self.remaining, self.size = self.size, 0
                    self.state = _S.DATA
            elif state == _S.DATA_CR:
                self.state = _S.DATA_LF if c == 0x0D else _S.LOST
            elif state == _S.DATA_LF:
                self.state = _S.SIZE if c == 0x0A else _S.LOST
            elif state == _S.TRAILER_START:
                self.state = _S.END_LF if c == 0x0D else _S.TRAILER
            elif state == _S.TRAILER:
                if c == 0x0A:
                    self.state = _S.TRAILER_START
            elif state == _S.END_LF:
                self.state = _S.DONE if c == 0x0A else _S.LOST
                if self.state == _S.DONE:
                    return i
            else:  # LOST: nothing more to judge
                return n
        return n
