"""HTTP/1.1 message rules for the proxy, sans-IO: validation, rewriting, canned responses.

Everything here is a pure function, a constant or a plain record, so the
protocol classes stay thin and every rule is unit-testable without sockets.
The hot path costs one ``HEADER_CODES`` lookup and one joined line per header
and one ``b"".join`` per head; everything else runs on rare paths.

Request smuggling defences are split between httptools and this module.  The
bundled llhttp (httptools >= 0.6.2) already refuses, in strict mode: bare LF
and bare CR line endings, obs-fold, invalid header names and values, both
Content-Length and Transfer-Encoding, duplicate or non-numeric Content-Length,
and a Transfer-Encoding whose final coding is not chunked.  ``PARSER_STRICT``
probes exactly those cases once at import: the proxy refuses to start on a
lenient parser rather than silently forwarding ambiguous framing (the raw head
bytes are not visible through httptools' callback API, so a pre-scan could not
cover pipelined heads).  On top, ``Request.check_head`` refuses what llhttp allows:
a Transfer-Encoding that is not exactly ``chunked``, Transfer-Encoding on an
HTTP/1.0 request, a missing or repeated Host on HTTP/1.1, an invalid Host, and
HTTP versions other than 1.0/1.1 (HTTP/0.9 included).
"""

from __future__ import annotations

from typing import Final

import httptools

# -- header classification ------------------------------------------------------------------
# One dict lookup per received header decides everything the proxy must do with it.
H_OTHER: Final = 0
H_HOST: Final = 1
H_CONTENT_LENGTH: Final = 2
H_TRANSFER_ENCODING: Final = 3
H_CONNECTION: Final = 4
H_HOP: Final = 5  # always hop-by-hop: dropped (Keep-Alive, TE, Trailer, Proxy-*, Upgrade...)
H_EXPECT: Final = 6
H_XFF: Final = 7
H_XFP: Final = 8
H_UPGRADE: Final = 9

HEADER_CODES: Final[dict[bytes, int]] = {
    b"host": H_HOST,
    b"content-length": H_CONTENT_LENGTH,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"connection": H_CONNECTION,
    b"keep-alive": H_HOP,
    b"proxy-connection": H_HOP,
    b"proxy-authorization": H_HOP,  # meant for this hop; never leak credentials upstream
    b"te": H_HOP,
    b"trailer": H_HOP,
    b"http2-settings": H_HOP,
    b"upgrade": H_UPGRADE,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XFP,
}


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


# -- request checks ----------------------------------------------------------------------------
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


def transfer_coding_ok(values: list[bytes]) -> bool:
    """Only a single, exact ``chunked`` coding is accepted (case-insensitive)."""
    return len(values) == 1 and values[0].strip().lower() == b"chunked"


# -- canned responses -----------------------------------------------------------------------
REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# Connection header modes of a response the proxy writes itself.
KEEP: Final = 0  # HTTP/1.1 persistent: no Connection header
CLOSE: Final = 1  # "Connection: close"; the proxy closes after writing
KEEP_10: Final = 2  # HTTP/1.0 client that asked for keep-alive


def error_response(status: int, mode: int, head_only: bool = False, retry_after: int = -1) -> bytes:
    """A complete small plain-text response; cached by ``canned`` for the hot cases."""
    reason = REASONS.get(status, b"Error")
    body = reason.lower() + b"\n"
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason), b"Server: backdial\r\n"]
    if retry_after >= 0:
        parts.append(b"Retry-After: %d\r\n" % retry_after)
    parts.append(b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body))
    if mode == CLOSE:
        parts.append(b"Connection: close\r\n")
    elif mode == KEEP_10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


_CANNED: dict[tuple[int, int, bool, int], bytes] = {}


def canned(status: int, mode: int, head_only: bool = False, retry_after: int = -1) -> bytes:
    """``error_response`` memoised: 503 bursts cost one dict lookup each."""
    key = (status, mode, head_only, retry_after)
    data = _CANNED.get(key)
    if data is None:
        data = error_response(status, mode, head_only, retry_after)
        if len(_CANNED) < 4096:  # Retry-After values are few; stay bounded regardless
            _CANNED[key] = data
    return data


# Precomputed bytes for the responses that always end the connection.
RESP_400: Final = error_response(400, CLOSE)
RESP_408: Final = error_response(408, CLOSE)
RESP_413: Final = error_response(413, CLOSE)
RESP_431: Final = error_response(431, CLOSE)
RESP_501: Final = error_response(501, CLOSE)
RESP_505: Final = error_response(505, CLOSE)
RESP_502: Final = error_response(502, KEEP)
RESP_503: Final = error_response(503, KEEP, retry_after=1)
RESP_504: Final = error_response(504, KEEP)


def status_line(status: int, reason: bytes) -> bytes:
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


# -- body framing ------------------------------------------------------------------------------
LAST_CHUNK: Final = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- forwarding headers --------------------------------------------------------------------------
def forwarded_node(ip: str) -> bytes:
    """RFC 7239 node: IPv6 addresses are bracketed and quoted."""
    if ":" in ip:
        return b'"[' + ip.encode("ascii") + b']"'
    return ip.encode("ascii") if ip else b"unknown"


def forwarding_block(ip: str, proto: bytes, via: bytes) -> bytes:
    """Via, X-Forwarded-Proto and Forwarded lines for one client connection (computed once)."""
    return b"".join(
        (
            b"Via: 1.1 ",
            via,
            b"\r\nX-Forwarded-Proto: ",
            proto,
            b"\r\nForwarded: for=",
            forwarded_node(ip),
            b";proto=",
            proto,
            b"\r\n",
        )
    )


def xff_line(previous: list[bytes], ip: str) -> bytes:
    """X-Forwarded-For with the client appended to whatever the client sent."""
    own = ip.encode("ascii") if ip else b"unknown"
    if not previous:
        return b"X-Forwarded-For: " + own + b"\r\n"
    return b"X-Forwarded-For: " + b", ".join([*previous, own]) + b"\r\n"


# -- the request record -----------------------------------------------------------------------
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
_NO_HEADERS: Final[dict[bytes, bytes]] = {}


class HttpError(Exception):
    """The request cannot be forwarded: answer *status* and close the connection."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Request:
    """One request as parsed: validated head, rewritten header lines, buffered body.

    ``add_header`` runs once per received field (the parser's callback), so it
    does one lower-case and one dict lookup and appends the ready-to-send line;
    ``check_head`` applies the framing and smuggling rules once the head is
    complete; ``build_head`` joins the upstream head in one ``b"".join``.
    """

    __slots__ = (
        "body",
        "body_len",
        "buffered",
        "chunked",
        "complete",
        "conn_values",
        "continue_sent",
        "error",
        "expect",
        "expect_continue",
        "head_only",
        "head_size",
        "host",
        "hosts",
        "hv",
        "idempotent",
        "in_head",
        "keep_alive",
        "length",
        "limit",
        "lines",
        "method",
        "retries",
        "service",
        "slice",
        "streaming",
        "t0",
        "te",
        "tunnel_pre",
        "upgrade",
        "upgrade_value",
        "url",
        "v10",
        "wanted",
        "wire",
        "xff",
    )

    def __init__(self, wanted: frozenset[bytes] = frozenset(), limit: int = 65536) -> None:
        self.wanted = wanted  # header names the slice rules look at
        self.limit = limit  # head bytes (and trailer bytes) allowed
        self.url = b""
        self.method = b""
        self.lines: list[bytes] = []
        self.hv: dict[bytes, bytes] = _NO_HEADERS
        self.host = b""
        self.hosts = 0
        self.length = -1
        self.te: list[bytes] | None = None
        self.conn_values: list[bytes] | None = None
        self.xff: list[bytes] | None = None
        self.expect: bytes | None = None
        self.upgrade_value = b""
        self.upgrade = False
        self.in_head = True
        self.head_size = 0
        self.keep_alive = True
        self.v10 = False
        self.head_only = False
        self.idempotent = False
        self.chunked = False
        self.expect_continue = False
        self.continue_sent = False
        # Body and serving state (owned by the proxy).
        self.body: list[bytes] = []
        self.body_len = 0
        self.buffered = 0
        self.complete = False
        self.streaming = False
        self.error: bytes | None = None
        self.retries = 0
        self.service = ""
        self.slice = ""
        self.t0 = 0.0
        self.wire = b""
        self.tunnel_pre = b""

    def add_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.limit:
            raise HttpError(431)
        if not self.in_head:
            return  # a chunked-body trailer: dropped deliberately (docs/sidecar.md)
        lname = name.lower()
        code = HEADER_CODES.get(lname, H_OTHER)
        if code == H_OTHER:
            self.lines.append(b"".join((name, b": ", value, b"\r\n")))
            if self.wanted and lname in self.wanted:
                if self.hv is _NO_HEADERS:
                    self.hv = {}
                prev = self.hv.get(lname)
                self.hv[lname] = value if prev is None else prev + b", " + value
        elif code == H_HOST:
            self.hosts += 1
            self.host = value
        elif code == H_CONTENT_LENGTH:
            self.length = int(value)  # llhttp accepted exactly one plain decimal
        elif code == H_TRANSFER_ENCODING:
            self.te = [value] if self.te is None else [*self.te, value]
        elif code == H_CONNECTION:
            self.conn_values = [value] if self.conn_values is None else [*self.conn_values, value]
        elif code == H_EXPECT:
            self.expect = value if self.expect is None else self.expect + b"," + value
        elif code == H_XFF:
            self.xff = [value] if self.xff is None else [*self.xff, value]
        elif code == H_UPGRADE:
            self.upgrade_value = value
        # H_HOP and X-Forwarded-Proto: dropped (the proxy sets its own X-Forwarded-Proto).

    def check_head(
        self, version: str, method: bytes, keep_alive: bool, upgrade: bool, max_body: int
    ) -> bytes:
        """Apply the framing rules to a complete head; the routing host, or HttpError."""
        self.in_head = False
        if version == "1.0":
            self.v10 = True
        elif version != "1.1":
            raise HttpError(505)  # HTTP/0.9 and anything newer spoken over HTTP/1 syntax
        self.method = method
        if method == b"CONNECT":
            raise HttpError(501)  # a reverse proxy: no forward tunnels
        if self.url[:1] != b"/" and not (self.url == b"*" and method == b"OPTIONS"):
            split = split_target(self.url)
            if split is None or split[0] is None:
                raise HttpError(400)
            self.host, self.url = split[0], split[1]  # absolute-form: the authority wins
            self.hosts = 1
        host = b""
        if self.hosts == 1:
            key = host_key(self.host)
            if key is None:
                raise HttpError(400)
            host = key
        elif self.hosts > 1 or not self.v10:
            raise HttpError(400)  # HTTP/1.1 requires exactly one Host
        if self.te is not None:
            if self.v10:
                raise HttpError(400)  # RFC 9112 §6.1: Transfer-Encoding in 1.0 is faulty framing
            if not transfer_coding_ok(self.te):
                raise HttpError(501)
            self.chunked = True
        if self.length > max_body:
            raise HttpError(413)
        self.keep_alive = keep_alive
        if self.conn_values is not None:
            named = connection_tokens(self.conn_values) - CONNECTION_BUILTIN
            if named:
                self.lines = drop_named(self.lines, named)
        if self.expect is not None:
            if self.expect.strip().lower() != b"100-continue":
                raise HttpError(417)
            self.expect_continue = not self.v10 and (self.length > 0 or self.chunked)
        if upgrade and self.upgrade_value:
            tokens = connection_tokens([self.upgrade_value])
            self.upgrade = any(t.startswith(b"websocket") for t in tokens)
        self.head_only = method == b"HEAD"
        self.idempotent = method in IDEMPOTENT
        return host

    def build_head(self, forwarding: bytes, xff: bytes, client_ip: str) -> bytes:
        """The upstream request head; *forwarding* and *xff* are the connection's lines."""
        parts = [self.method, b" ", self.url, b" HTTP/1.1\r\nHost: ", self.host, b"\r\n"]
        parts += self.lines
        parts.append(forwarding)
        parts.append(xff if self.xff is None else xff_line(self.xff, client_ip))
        if self.upgrade:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", self.upgrade_value, b"\r\n")
        if self.streaming:
            if self.chunked:
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                parts.append(b"Content-Length: %d\r\n" % self.length)
        elif self.chunked or self.length >= 0:
            parts.append(b"Content-Length: %d\r\n" % self.body_len)  # chunked, re-framed whole
        parts.append(b"\r\n")
        return b"".join(parts)


def failed_request(status: int) -> Request:
    """A placeholder that answers *status* (with Connection: close) in pipeline order."""
    r = Request()
    r.in_head = False
    r.complete = True
    r.error = canned(status, CLOSE)
    return r


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
