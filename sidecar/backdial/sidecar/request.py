"""The proxy's request record: validation, smuggling rules and the rewritten head, sans-IO.

``Request`` collects what httptools reports for one client request: one
``FIELDS`` lookup and one joined line per header (``add_header``), the
framing and smuggling rules once the head is complete (``check_head``), and
the upstream head in one ``b"".join`` (``build_head``).  Header rules shared
with the rest of backdial live in ``backdial.http1``.

Request smuggling defences are split between httptools and this module.  The
bundled llhttp (httptools >= 0.6.2) already refuses, in strict mode: bare LF
and bare CR line endings, obs-fold, invalid header names and values, both
Content-Length and Transfer-Encoding, duplicate or non-numeric Content-Length,
and a Transfer-Encoding whose final coding is not chunked
(``http1.PARSER_STRICT`` proves it at import: the raw head bytes are not
visible through httptools' callback API, so a pre-scan could not cover
pipelined heads).  On top, ``Request.check_head`` refuses what llhttp allows:
a Transfer-Encoding that is not exactly ``chunked``, Transfer-Encoding on an
HTTP/1.0 request, a missing or repeated Host on HTTP/1.1, an invalid Host, and
HTTP versions other than 1.0/1.1 (HTTP/0.9 included).
"""

from __future__ import annotations

from typing import Final

from backdial.http1 import (
    CONNECTION_BUILTIN,
    FIELDS,
    ConnMode,
    Field,
    canned,
    connection_tokens,
    drop_named,
    host_key,
    split_target,
    transfer_coding_ok,
)
from backdial.sidecar.spool import Spool

# Enum members bound once: attribute access on an enum class costs ~0.1 us on 3.11,
# and add_header runs once per received field.
_OTHER: Final = Field.OTHER
_HOST: Final = Field.HOST
_CONTENT_LENGTH: Final = Field.CONTENT_LENGTH
_TRANSFER_ENCODING: Final = Field.TRANSFER_ENCODING
_CONNECTION: Final = Field.CONNECTION
_EXPECT: Final = Field.EXPECT
_XFF: Final = Field.XFF
_FORWARDED: Final = Field.FORWARDED
_UPGRADE: Final = Field.UPGRADE


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
        "claimed",
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
        "spool",
        "spooled",
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
        self.claimed: list[bytes] | None = None  # Forwarded / X-Real-IP lines as received
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
        self.complete = False
        self.streaming = False
        self.error: bytes | None = None
        self.retries = 0
        self.service = ""
        self.slice = ""
        self.spool: Spool | None = None  # the body while it is received, and its unsent rest
        self.spooled = False  # part of the body came from a spool file (no retry possible)
        self.buffered = 0  # bytes of ``body`` booked in the memory budget (spooling off)
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
        code = FIELDS.get(lname, _OTHER)
        if code == _OTHER:
            self.lines.append(b"".join((name, b": ", value, b"\r\n")))
            if self.wanted and lname in self.wanted:
                if self.hv is _NO_HEADERS:
                    self.hv = {}
                prev = self.hv.get(lname)
                self.hv[lname] = value if prev is None else prev + b", " + value
        elif code == _HOST:
            self.hosts += 1
            self.host = value
        elif code == _CONTENT_LENGTH:
            self.length = int(value)  # llhttp accepted exactly one plain decimal
        elif code == _TRANSFER_ENCODING:
            self.te = [value] if self.te is None else [*self.te, value]
        elif code == _CONNECTION:
            self.conn_values = [value] if self.conn_values is None else [*self.conn_values, value]
        elif code == _EXPECT:
            self.expect = value if self.expect is None else self.expect + b"," + value
        elif code == _XFF:
            self.xff = [value] if self.xff is None else [*self.xff, value]
        elif code == _UPGRADE:
            self.upgrade_value = value
        elif code == _FORWARDED:
            line = b"".join((name, b": ", value, b"\r\n"))
            self.claimed = [line] if self.claimed is None else [*self.claimed, line]
        # Field.HOP and X-Forwarded-Proto: dropped (the proxy sets its own X-Forwarded-Proto).

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

    @property
    def claims(self) -> bool:
        """The client sent forwarding fields (X-Forwarded-For, Forwarded, X-Real-IP)."""
        return self.xff is not None or self.claimed is not None

    def build_head(
        self, forwarding: bytes, xff: bytes, client_ip: str, trusted: bool = False
    ) -> bytes:
        """The upstream head; *forwarding* and *xff* are the connection's lines.

        The client's own forwarding fields are kept (ours appended) only when the
        peer is a trusted proxy; otherwise ours replace them (``realip.py``).
        """
        parts = [self.method, b" ", self.url, b" HTTP/1.1\r\nHost: ", self.host, b"\r\n"]
        parts += self.lines
        if trusted and self.claimed is not None:
            parts += self.claimed  # before ours: Forwarded elements stay in hop order
        parts.append(forwarding)
        parts.append(xff_line(self.xff, client_ip) if trusted and self.xff is not None else xff)
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
    r.error = canned(status, ConnMode.CLOSE)
    return r
