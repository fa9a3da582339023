"""Registration wire protocol (service -> acceptor), sans-IO.

A service instance opens a stream connection to the acceptor and sends one
preamble line; the acceptor answers with one line; after ``OK`` the connection
is a *session* carrying HTTP/1.1 requests proxy -> service.  On an idle
session the service may write one ``RETIRE`` line to give the session back;
the acceptor writes the same line on an idle session it takes back (its cap
shrank) and closes it.
``docs/protocol.md`` is the byte-level specification; this module is the
reference implementation and the only place in Python that formats or parses
these lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MAGIC = b"BDREG/1"
VERSION = 1
MAX_PREAMBLE = 1024  # bytes, including the terminating CRLF
RETIRE_LINE = b"BDREG/1 RETIRE\r\n"

_VALUE_RE = re.compile(rb"[A-Za-z0-9._~:@+\-]{1,128}")
_REQUIRED = ("service", "instance")
_OPTIONAL = ("slice", "token")


class ErrCode(StrEnum):
    """Machine-readable reason carried by an ``ERR`` reply."""

    VERSION = "version"
    MALFORMED = "malformed"
    TOO_LONG = "too-long"
    TIMEOUT = "timeout"
    AUTH = "auth"
    LIMIT = "limit"
    DRAINING = "draining"


class PreambleError(Exception):
    """A preamble the acceptor refuses; ``code`` and ``message`` go on the wire."""

    def __init__(self, code: ErrCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Preamble:
    """What a registering service says about itself."""

    service: str
    instance: str
    slice: str | None = None
    token: str | None = None

    def encode(self) -> bytes:
        parts = [MAGIC, b"service=" + _check(self.service), b"instance=" + _check(self.instance)]
        if self.slice is not None:
            parts.append(b"slice=" + _check(self.slice))
        if self.token is not None:
            parts.append(b"token=" + _check(self.token))
        line = b" ".join(parts) + b"\r\n"
        if len(line) > MAX_PREAMBLE:
            raise ValueError(f"preamble longer than {MAX_PREAMBLE} bytes")
        return line


def _check(value: str) -> bytes:
    raw = value.encode("ascii", "strict") if value.isascii() else b""
    if not _VALUE_RE.fullmatch(raw):
        raise ValueError(f"invalid preamble value {value!r}: 1-128 chars of [A-Za-z0-9._~:@+-]")
    return raw


def find_line(buf: bytes | bytearray) -> int:
    """Index just past the first CRLF in *buf*, or -1 when no full line is there.

    Raises PreambleError when the buffer already exceeds the size limit without
    a line end, or holds a bare LF (ambiguous line endings are refused).
    """
    end = buf.find(b"\n")
    if end < 0:
        if len(buf) >= MAX_PREAMBLE:
            raise PreambleError(ErrCode.TOO_LONG, f"no line end within {MAX_PREAMBLE} bytes")
        return -1
    if end + 1 > MAX_PREAMBLE:
        raise PreambleError(ErrCode.TOO_LONG, f"preamble longer than {MAX_PREAMBLE} bytes")
    if end == 0 or buf[end - 1] != 0x0D:
        raise PreambleError(ErrCode.MALFORMED, "line must end with CRLF")
    return end + 1


def parse_preamble(line: bytes) -> Preamble:
    """Parse one full preamble line (with its CRLF) or raise PreambleError."""
    if not line.endswith(b"\r\n"):
        raise PreambleError(ErrCode.MALFORMED, "line must end with CRLF")
    if len(line) > MAX_PREAMBLE:
        raise PreambleError(ErrCode.TOO_LONG, f"preamble longer than {MAX_PREAMBLE} bytes")
    words = line[:-2].split(b" ")
    head = words[0]
    if not head.startswith(b"BDREG/"):
        raise PreambleError(ErrCode.MALFORMED, "preamble must start with BDREG/<version>")
    if head != MAGIC:
        raise PreambleError(
            ErrCode.VERSION, f"unsupported version {head[6:]!r}; this acceptor speaks 1"
        )
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition(b"=")
        name = key.decode("ascii", "replace")
        if not eq or not key:
            raise PreambleError(ErrCode.MALFORMED, f"expected key=value, got {word[:40]!r}")
        if name not in _REQUIRED and name not in _OPTIONAL:
            if name.startswith("x-"):
                continue  # extension keys are reserved for forward compatibility
            raise PreambleError(ErrCode.MALFORMED, f"unknown key {name!r}")
        if name in fields:
            raise PreambleError(ErrCode.MALFORMED, f"duplicate key {name!r}")
        if not _VALUE_RE.fullmatch(value):
            raise PreambleError(ErrCode.MALFORMED, f"invalid value for {name!r}")
        fields[name] = value.decode("ascii")
    for name in _REQUIRED:
        if name not in fields:
            raise PreambleError(ErrCode.MALFORMED, f"missing key {name!r}")
    return Preamble(
        service=fields["service"],
        instance=fields["instance"],
        slice=fields.get("slice"),
        token=fields.get("token"),
    )


def encode_ok(session: int, registrant: int) -> bytes:
    return b"BDREG/1 OK session=%d registrant=%d\r\n" % (session, registrant)


def encode_err(code: ErrCode, message: str) -> bytes:
    text = message.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return b"BDREG/1 ERR " + code.value.encode() + b" " + text[:200] + b"\r\n"


@dataclass(frozen=True, slots=True)
class Reply:
    """The acceptor's answer as the service sees it.

    ``code`` is None for ``OK``, and also for an ``ERR`` whose code this version
    does not know (a newer acceptor's); ``message`` then starts with that code.
    """

    ok: bool
    session: int = 0
    registrant: int = 0
    code: ErrCode | None = None
    message: str = ""


def parse_reply(line: bytes) -> Reply:
    """Parse the acceptor's reply line; raises ValueError on anything else."""
    if not line.endswith(b"\r\n") or not line.startswith(MAGIC + b" "):
        raise ValueError(f"not a BDREG/1 reply: {line[:60]!r}")
    body = line[len(MAGIC) + 1 : -2]
    if body.startswith(b"OK"):
        fields = dict(w.split(b"=", 1) for w in body.split(b" ")[1:] if b"=" in w)
        return Reply(True, int(fields.get(b"session", b"0")), int(fields.get(b"registrant", b"0")))
    if body.startswith(b"ERR "):
        _, raw, text = [*body.split(b" ", 2), b""][:3]
        message = text.decode("ascii", "replace")
        try:
            return Reply(False, code=ErrCode(raw.decode("ascii")), message=message)
        except (UnicodeDecodeError, ValueError):
            return Reply(False, message=f"{raw.decode('ascii', 'replace')}: {message}")
    raise ValueError(f"not a BDREG/1 reply: {line[:60]!r}")
