"""The HTTP/1.1 toolkit every backdial component shares, sans-IO.

Header rules (which fields are hop-by-hop, how ``Connection`` is read), request
targets, status lines, chunk framing and small complete responses, as pure
functions and constants.  The sidecar proxy, the SDK's server core and its
bridge, and the admin servers all use these, so a rule is written once and
every component applies it the same way.  The proxy's request record and its
smuggling checks build on it in ``backdial.sidecar.request``.

Parsing itself is httptools (llhttp).  ``PARSER_STRICT`` feeds the installed
parser the ambiguous framings strict llhttp refuses (bare LF and CR, obs-fold,
invalid names and values, conflicting or repeated lengths) once at import;
the proxy refuses to start on a lenient parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from http import HTTPStatus
from typing import Any, Final

import httptools


# -- header classification ------------------------------------------------------------------
class Field(IntEnum):
    """What a received header field means to a proxy (one dict lookup per field)."""

    OTHER = 0
    HOST = 1
    CONTENT_LENGTH = 2
    TRANSFER_ENCODING = 3
    CONNECTION = 4
    HOP = 5  # always hop-by-hop: dropped (Keep-Alive, TE, Trailer, Proxy-*, HTTP2-Settings)
    EXPECT = 6
    XFF = 7
    XFP = 8
    UPGRADE = 9
    FORWARDED = 10  # Forwarded, X-Real-IP: client claims believed only from trusted proxies


FIELDS: Final[dict[bytes, Field]] = {
    b"host": Field.HOST,
    b"content-length": Field.CONTENT_LENGTH,
    b"transfer-encoding": Field.TRANSFER_ENCODING,
    b"connection": Field.CONNECTION,
    b"keep-alive": Field.HOP,
    b"proxy-connection": Field.HOP,
    b"proxy-authorization": Field.HOP,  # meant for this hop; never leak credentials upstream
    b"te": Field.HOP,
    b"trailer": Field.HOP,
    b"http2-settings": Field.HOP,
    b"upgrade": Field.UPGRADE,
    b"expect": Field.EXPECT,
    b"x-forwarded-for": Field.XFF,
    b"x-forwarded-proto": Field.XFP,
    b"forwarded": Field.FORWARDED,
    b"x-real-ip": Field.FORWARDED,
}

# Fields that describe one connection, not the message (RFC 9110 §7.6.1), plus the
# framing fields a relay re-creates itself: never forwarded as received.
HOP_BY_HOP: Final = frozenset(
    name
    for name, kind in FIELDS.items()
    if kind in (Field.HOP, Field.CONNECTION, Field.TRANSFER_ENCODING, Field.UPGRADE)
)

CONNECTION_BUILTIN: Final = frozenset((b"close", b"keep-alive", b"upgrade"))


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-cased tokens of every Connection header (a list-valued field)."""
    out: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                out.add(token)
    return out


def drop_named(lines: list[bytes], names: set[bytes]) -> list[bytes]:
    """Remove header lines whose field name is in *names* (Connection-nominated hop-by-hop)."""
    return [ln for ln in lines if ln[: ln.index(b":")].lower() not in names]


_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]")


def field_ok(name: bytes, value: bytes) -> bool:
    """A field name is a token and its value holds no CR, LF or NUL (RFC 9110 §5)."""
    return _TOKEN.fullmatch(name) is not None and _BAD_VALUE.search(value) is None


def expects_continue(value: bytes) -> bool:
    """An ``Expect`` value this hop can honour: exactly ``100-continue``."""
    return value.strip().lower() == b"100-continue"


def transfer_coding_ok(values: list[bytes]) -> bool:
    """Only a single, exact ``chunked`` coding is accepted (case-insensitive)."""
    return len(values) == 1 and values[0].strip().lower() == b"chunked"


# -- request targets and hosts ---------------------------------------------------------------
# Host: reg-name / IPv4 / IP-literal with optional port (RFC 3986 characters only).
_HOST_CHARS: Final = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"
)


def host_key(value: bytes) -> bytes | None:
    """Lower-cased host without port, for routing; None when the value is not a valid Host."""
    if value.translate(None, _HOST_CHARS):
        return None
    value = value.lower()
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0 or (end + 1 < len(value) and value[end + 1 : end + 2] != b":"):
            return None
        return value[: end + 1]
    host, _, port = value.partition(b":")
    if port and not port.isdigit():
        return None
    return host


def split_target(url: bytes) -> tuple[bytes | None, bytes] | None:
    """(authority or None, origin-form target) of a request-target; None when unusable.

    absolute-form (``http://host/p?q``) is accepted as RFC 9112 §3.2.2 requires, and
    forwarded in origin-form with Host taken from the authority.  asterisk-form
    is left to the caller (only OPTIONS may use it).
    """
    if url[:1] == b"/":
        return None, url
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        rest = url[7:]
    elif lower.startswith(b"https://"):
        rest = url[8:]
    else:
        return None
    cut = len(rest)
    for sep in (b"/", b"?"):
        pos = rest.find(sep)
        if 0 <= pos < cut:
            cut = pos
    authority, target = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:  # userinfo is deprecated and a phishing vector
        return None
    if not target.startswith(b"/"):
        target = b"/" + target
    return authority, target


def path_of(target: bytes) -> bytes:
    q = target.find(b"?")
    return target if q < 0 else target[:q]


# -- status lines, connection and body framing decisions ---------------------------------------
REASONS: Final[dict[int, bytes]] = {int(s): s.phrase.encode("ascii") for s in HTTPStatus}
REASONS[413] = b"Content Too Large"  # RFC 9110's name; http.HTTPStatus still has the old one

# Precomputed once: formatting status lines per response showed in profiles.
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()
}

CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class ConnMode(IntEnum):
    """How a response ends its connection, i.e. which Connection field it carries."""

    KEEP = 0  # HTTP/1.1 persistent: no Connection field
    CLOSE = 1  # "Connection: close"; the writer closes after the response
    KEEP_10 = 2  # HTTP/1.0 peer that asked for keep-alive: "Connection: keep-alive"


CONNECTION_LINE: Final[dict[ConnMode, bytes]] = {
    ConnMode.KEEP: b"",
    ConnMode.CLOSE: b"Connection: close\r\n",
    ConnMode.KEEP_10: b"Connection: keep-alive\r\n",
}


def conn_mode(keep_alive: bool, http10: bool) -> ConnMode:
    if not keep_alive:
        return ConnMode.CLOSE
    return ConnMode.KEEP_10 if http10 else ConnMode.KEEP


class BodyMode(IntEnum):
    """How a response body is framed towards the peer."""

    LENGTH = 0  # Content-Length
    CHUNK = 1  # chunked (HTTP/1.1 peer, length unknown)
    EOF = 2  # close-delimited (HTTP/1.0 peer, length unknown): the connection ends
    NONE = 3  # HEAD, 1xx, 204, 304: no body whatever the fields say
    TUNNEL = 4  # 101 Switching Protocols: raw bytes both ways


def body_allowed(status: int, head_only: bool) -> bool:
    """Whether a response with *status* to this request carries a body (RFC 9110 §6.4.1)."""
    return not (head_only or status < 200 or status == 204 or status == 304)


def body_mode(status: int, head_only: bool, length: int, http10: bool) -> BodyMode:
    """Framing of a response body: *length* is its size, or -1 when not known up front."""
    if status == 101:
        return BodyMode.TUNNEL
    if not body_allowed(status, head_only):
        return BodyMode.NONE
    if length >= 0:
        return BodyMode.LENGTH
    return BodyMode.EOF if http10 else BodyMode.CHUNK


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """``HTTP/1.1 <status> <reason>``; the standard phrase when *reason* is None."""
    if reason is None:
        line = STATUS_LINES.get(status)
        if line is not None:
            return line
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status}")
        reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


_STATUS_LINES: dict[int, tuple[bytes, bytes]] = {}


def cached_status_line(status: int, reason: bytes) -> bytes:
    """The status line, memoised per code for the reason phrase seen first (one lookup)."""
    cached = _STATUS_LINES.get(status)
    if cached is not None and cached[0] == reason:
        return cached[1]
    line = status_line(status, reason)
    if cached is None and 100 <= status <= 999:
        _STATUS_LINES[status] = (reason, line)
    return line


def error_response(
    status: int, mode: ConnMode, head_only: bool = False, retry_after: int = -1
) -> bytes:
    """A complete small plain-text response; cached by ``canned`` for the hot cases."""
    reason = REASONS.get(status, b"Error")
    body = reason.lower() + b"\n"
    parts = [status_line(status, reason), b"Server: backdial\r\n"]
    if retry_after >= 0:
        parts.append(b"Retry-After: %d\r\n" % retry_after)
    parts.append(b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body))
    parts.append(CONNECTION_LINE[mode])
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


_CANNED: dict[tuple[int, int, bool, int], bytes] = {}


def canned(status: int, mode: ConnMode, head_only: bool = False, retry_after: int = -1) -> bytes:
    """``error_response`` memoised: 503 bursts cost one dict lookup each."""
    key = (status, mode, head_only, retry_after)
    data = _CANNED.get(key)
    if data is None:
        data = error_response(status, mode, head_only, retry_after)
        if len(_CANNED) < 4096:  # Retry-After values are few; stay bounded regardless
            _CANNED[key] = data
    return data


# -- chunked framing -------------------------------------------------------------------------
LAST_CHUNK: Final = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- whole heads, for handshakes and clients that read a head before anything else ------------
class HeadError(ValueError):
    """A message head that strict llhttp refuses (or that is incomplete)."""


@dataclass(frozen=True, slots=True)
class Head:
    """One parsed request or response head; field names lower-cased, repeats joined."""

    version: str
    fields: dict[str, str]
    method: str = ""  # requests
    target: str = ""
    status: int = 0  # responses

    def header(self, name: str) -> str:
        return self.fields.get(name.lower(), "")

    def tokens(self, name: str) -> set[str]:
        """The lower-cased tokens of a list-valued field such as ``Connection``."""
        return {
            t.decode("latin-1") for t in connection_tokens([self.header(name).encode("latin-1")])
        }


class _HeadCollector:
    def __init__(self) -> None:
        self.url = b""
        self.fields: dict[str, str] = {}
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.fields[key] = f"{self.fields[key]}, {text}" if key in self.fields else text

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(head: bytes, response: bool = False) -> Head:
    """A complete head (up to and including the blank line), parsed by strict llhttp."""
    sink = _HeadCollector()
    parser: Any = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(sink)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
        # An upgrade (or 101) pauses llhttp right after the head: the head is what we wanted.
        if not sink.complete:
            raise HeadError(str(exc) or "malformed head") from None
    if not sink.complete:
        raise HeadError("incomplete head")
    version = parser.get_http_version()
    if response:
        return Head(version, sink.fields, status=parser.get_status_code())
    method = parser.get_method().decode("ascii")
    return Head(version, sink.fields, method=method, target=sink.url.decode("latin-1"))


# -- parser strictness probe -------------------------------------------------------------------
_MUST_REJECT: Final = (
    b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n",  # obs-fold
    b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",  # invalid name
    b"GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n",  # invalid value
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
)


class _Sink:
    def on_header(self, name: bytes, value: bytes) -> None:
        return None


def _probe() -> bool:
    for raw in _MUST_REJECT:
        try:
            httptools.HttpRequestParser(_Sink()).feed_data(raw)
        except httptools.HttpParserError:
            continue
        return False
    return True


PARSER_STRICT: Final = _probe()


def require_strict_parser() -> None:
    if not PARSER_STRICT:
        raise RuntimeError(
            "the installed httptools accepts ambiguous HTTP framing (bare LF, obs-fold or "
            "conflicting lengths); install httptools>=0.6.2 (strict llhttp 9)"
        )
