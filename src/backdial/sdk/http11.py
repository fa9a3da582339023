"""HTTP/1.1 message framing for the SDK's server core, sans-IO.

Everything here is a pure function or a small state machine that turns
values into bytes; no sockets, no event loop.  The asyncio shell in
``connection.py`` feeds it and writes whatever it returns.  Keeping framing
decisions here means they can be tested byte-for-byte without a socket and
that the hot path does the minimum: one precomputed status line, one join.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote

# Status lines are precomputed once: formatting them per response showed up
# in profiles of the 40k req/s benchmark path.
STATUS_LINES: dict[int, bytes] = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode("ascii")) for s in HTTPStatus
}

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_RE = re.compile(rb"[\x00\r\n]")

# Request headers and response headers that describe the connection rather
# than the message; the core owns them and never lets an app set them.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def body_allowed(status: int, is_head: bool) -> bool:
    """Whether a response with *status* to this request carries a body (RFC 9110 6.4.1)."""
    return not (is_head or status < 200 or status == 204 or status == 304)


class _DateCache:
    """The ``Date`` header value, reformatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def header(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = b"date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._value


DATE = _DateCache()


def split_target(target: bytes) -> tuple[str, bytes, bytes]:
    """Split a request target into (decoded path, raw path, query string).

    Origin-form (``/a/b?x=1``) is what proxies send and is handled without a
    URL parser; absolute-form is reduced to its path.  The decoded path is
    percent-decoded UTF-8 as ASGI requires.
    """
    if target[:1] != b"/":
        if target == b"*":
            return "*", b"*", b""
        # absolute-form: strip scheme://authority
        scheme_end = target.find(b"://")
        if scheme_end >= 0:
            slash = target.find(b"/", scheme_end + 3)
            qmark = target.find(b"?", scheme_end + 3)
            if slash < 0 or (0 <= qmark < slash):
                target = b"/" + (target[qmark:] if qmark >= 0 else b"")
            else:
                target = target[slash:]
    raw_path, _, query = target.partition(b"?")
    query = query.partition(b"#")[0]
    path = raw_path.decode("latin-1")
    if "%" in path:
        path = unquote(path, encoding="utf-8", errors="surrogateescape")
    return path, raw_path, query


class FramingError(RuntimeError):
    """The app's response cannot be framed correctly (e.g. longer than its Content-Length)."""


class ResponseFramer:
    """Turns one ASGI-shaped response (start + body parts) into wire bytes.

    The head is held back until the first body part so that head and a small
    body leave in one ``write`` (one syscall); ``flush_head`` exists for apps
    that start a response and then wait before producing body.
    """

    __slots__ = (
        "_headers",
        "_remaining",
        "body_allowed",
        "chunked",
        "content_length",
        "finished",
        "head_sent",
        "http11",
        "is_head",
        "keep_alive",
        "status",
    )

    def __init__(self, *, is_head: bool, keep_alive: bool, http11: bool) -> None:
        self.is_head = is_head
        self.keep_alive = keep_alive
        self.http11 = http11
        self.status = 0
        self._headers: list[bytes] = []
        self.content_length: int | None = None
        self._remaining = 0
        self.body_allowed = True
        self.chunked = False
        self.head_sent = False
        self.finished = False

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Validate and remember the head; nothing is emitted yet."""
        out = [status_line(status)]
        has_date = False
        for name, value in headers:
            if not _TOKEN_RE.fullmatch(name) or _BAD_VALUE_RE.search(value):
                raise FramingError(f"invalid response header {name[:40]!r}")
            lname = name.lower()
            if lname in _FRAMING:
                if lname == b"content-length":
                    try:
                        self.content_length = int(value)
                    except ValueError:
                        raise FramingError(f"invalid content-length {value[:20]!r}") from None
                    if self.content_length < 0:
                        raise FramingError("negative content-length")
                elif lname == b"connection" and b"close" in value.lower():
                    self.keep_alive = False
                continue  # framing headers are re-emitted by _emit_head
            if lname == b"date":
                has_date = True
            out.append(name + b": " + value + b"\r\n")
        if not has_date:
            out.append(DATE.header())
        self.status = status
        self._headers = out
        self.body_allowed = body_allowed(status, self.is_head)

    def _emit_head(self, first: bytes | None) -> bytes:
        """Decide framing and return the head.  *first* is the complete body if known."""
        out = self._headers
        if self.content_length is not None:
            if self.status >= 200 and self.status not in (204, 304):
                out.append(b"content-length: %d\r\n" % self.content_length)
            self._remaining = self.content_length if self.body_allowed else 0
        elif not body_allowed(self.status, False):
            pass  # 1xx/204/304 carry neither body nor length
        elif first is not None:
            self.content_length = len(first)
            out.append(b"content-length: %d\r\n" % len(first))
            self._remaining = len(first) if self.body_allowed else 0
        elif self.http11:
            out.append(b"transfer-encoding: chunked\r\n")
            self.chunked = self.body_allowed
        else:
            self.keep_alive = False  # HTTP/1.0 streaming: the close delimits the body
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        elif not self.http11:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.head_sent = True
        return b"".join(out)

    def flush_head(self) -> bytes:
        """Emit the head now (framing chosen without knowing the body length)."""
        if self.head_sent or not self._headers:
            return b""
        return self._emit_head(None)

    def body(self, data: bytes, more: bool) -> bytes:
        """Frame one body part; ``more=False`` ends the response."""
        if self.finished:
            raise FramingError("response already finished")
        head = b""
        if not self.head_sent:
            head = self._emit_head(None if more else data)
        if not more:
            self.finished = True
        if not self.body_allowed:
            return head
        if self.chunked:
            if data:
                framed = b"%x\r\n%b\r\n" % (len(data), data)
                if not more:
                    framed += LAST_CHUNK
            else:
                framed = b"" if more else LAST_CHUNK
            return head + framed if head else framed
        if self.content_length is not None:
            self._remaining -= len(data)
            if self._remaining < 0:
                self.keep_alive = False
                raise FramingError("response body longer than its content-length")
            if not more and self._remaining:
                # Truncated: only closing the connection tells the peer.
                self.keep_alive = False
        return head + data if head else data


def simple_response(status: int, body: bytes, *, close: bool) -> bytes:
    """A complete small response (used for 400/500 written by the core itself)."""
    framer = ResponseFramer(is_head=False, keep_alive=not close, http11=True)
    framer.start(status, [(b"content-type", b"text/plain; charset=utf-8")])
    return framer.body(body, False)
