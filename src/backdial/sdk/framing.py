"""Response framing for the SDK's server core, sans-IO: ASGI messages to wire bytes.

``ResponseFramer`` is a small state machine that turns one ASGI response
(``http.response.start`` + body parts) into bytes; ``asgi_target`` splits a
request-target the way an ASGI scope wants it.  Header rules, status lines,
the framing decision and chunk encoding are ``backdial.http1``'s, shared
with the sidecar; this module adds only what a server of ASGI apps needs on
top (validating the app's fields, the ``Date`` field, a length check).  The
asyncio shell in ``connection.py`` feeds it and writes whatever it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from urllib.parse import unquote

from backdial.http1 import (
    CONNECTION_LINE,
    LAST_CHUNK,
    BodyMode,
    body_mode,
    chunk,
    conn_mode,
    field_ok,
    split_target,
    status_line,
)

# Fields that describe the connection or the framing: the core owns them and never
# lets an app set them (it re-creates Content-Length itself).
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class _DateCache:
    """The ``Date`` field, reformatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def header(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._value


DATE = _DateCache()


def asgi_target(target: bytes) -> tuple[str, bytes, bytes] | None:
    """(decoded path, raw path, query string) of a request-target; None when unusable.

    Origin-form is what proxies send; absolute-form is reduced to its path
    (``http1.split_target``) and ``*`` stays ``*``.  The decoded path is
    percent-decoded UTF-8, as ASGI requires.
    """
    if target == b"*":
        return "*", b"*", b""
    split = split_target(target)
    if split is None:
        return None
    raw_path, _, query = split[1].partition(b"?")
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
        "_mode",
        "_remaining",
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
        self._mode = BodyMode.NONE
        self.head_sent = False
        self.finished = False

    @property
    def chunked(self) -> bool:
        return self._mode == BodyMode.CHUNK

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Validate and remember the head; nothing is emitted yet."""
        try:
            out = [status_line(status)]
        except ValueError as exc:
            raise FramingError(str(exc)) from None
        has_date = False
        for name, value in headers:
            if not field_ok(name, value):
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
                continue  # framing fields are re-emitted by _emit_head
            if lname == b"date":
                has_date = True
            out.append(name + b": " + value + b"\r\n")
        if not has_date:
            out.append(DATE.header())
        self.status = status
        self._headers = out

    def _emit_head(self, first: bytes | None) -> bytes:
        """Decide framing and return the head.  *first* is the complete body if known."""
        out = self._headers
        length = self.content_length
        if length is None and first is not None:
            length = self.content_length = len(first)
        # An app cannot switch protocols here: a 101 is framed as a response without body.
        mode = body_mode(self.status, self.is_head, -1 if length is None else length, False)
        if mode == BodyMode.TUNNEL:
            mode = BodyMode.NONE
        if mode == BodyMode.CHUNK and not self.http11:
            mode = BodyMode.EOF
        if length is not None and self.status >= 200 and self.status not in (204, 304):
            # A HEAD response announces the length its GET would have.
            out.append(b"Content-Length: %d\r\n" % length)
        if mode == BodyMode.LENGTH:
            self._remaining = length or 0
        elif mode == BodyMode.CHUNK:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif mode == BodyMode.EOF:
            self.keep_alive = False  # HTTP/1.0 streaming: the close delimits the body
        self._mode = mode
        out.append(CONNECTION_LINE[conn_mode(self.keep_alive, not self.http11)])
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
        mode = self._mode
        if mode == BodyMode.NONE:
            return head
        if mode == BodyMode.CHUNK:
            framed = chunk(data) if data else b""
            if not more:
                framed += LAST_CHUNK
            return head + framed if head else framed
        if mode == BodyMode.LENGTH:
            self._remaining -= len(data)
            if self._remaining < 0:
                self.keep_alive = False
                raise FramingError("response body longer than its content-length")
            if not more and self._remaining:
                # Truncated: only closing the connection tells the peer.
                self.keep_alive = False
        return head + data if head else data
