"""Config stream protocol (acceptor -> operator), sans-IO.

Each pod's acceptor dials the operator over TLS and sends one HTTP/1.1 request that
upgrades the connection to ``backdial-config/1``; the bearer token is the pod's projected
ServiceAccount token (audience ``backdial``), and the path names the pod the acceptor
claims to be.  After ``101 Switching Protocols`` both sides write newline-delimited JSON
messages: the operator sends CONFIG (versioned) and PING, the acceptor HELLO, ACK and
REPORT.  ``docs/operator.md`` ("Delivery protocol") is the specification; this module
formats and parses every byte of it, for both ends.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from backdial import http1

PROTOCOL = "backdial-config/1"
AUDIENCE = "backdial"
MAX_HEAD = 16 * 1024  # request or response head, CRLFCRLF included
MAX_LINE = 1 << 20  # one message (a CONFIG carries the slice table)
KEEPALIVE = 10.0  # seconds: each side sends something at least this often
DEAD_AFTER = 3 * KEEPALIVE  # nothing received for this long: the peer is gone
REPORT_INTERVAL = 1.0  # figures go upstream at most this often while they change

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_POD_NAME = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
_PATH = re.compile(rf"^/v1/namespaces/(?P<ns>{_DNS_LABEL})/pods/(?P<pod>{_POD_NAME})/config$")


class StreamError(Exception):
    """Bytes that do not follow the protocol; the connection is closed."""


class Kind(StrEnum):
    HELLO = "hello"  # a->o  first message: what the acceptor has applied
    CONFIG = "config"  # o->a  the pod's config (policy None: no SessionSlice owns the pod)
    ACK = "ack"  # a->o  a CONFIG was applied (or refused, with the reason)
    REPORT = "report"  # a->o  figures
    PING = "ping"  # both  keepalive


@dataclass(frozen=True, slots=True)
class Hello:
    generation: int = 0
    version: str = ""
    owner: str = ""
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    generation: int
    version: str
    owner: str  # "namespace/name" of the SessionSlice
    policy: dict[str, Any] | None  # partial acceptor policy: "slices" and "limits"


@dataclass(frozen=True, slots=True)
class Ack:
    generation: int
    version: str
    ok: bool = True
    error: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    registered: int = 0
    leased: int = 0
    waiting: int = 0
    cap: int = 0
    slices: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> leased/waiting

    def figures(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Message = Hello | Config | Ack | Report | Ping
_KIND: dict[type[Any], Kind] = {
    Hello: Kind.HELLO,
    Config: Kind.CONFIG,
    Ack: Kind.ACK,
    Report: Kind.REPORT,
    Ping: Kind.PING,
}
_CLASS = {kind: cls for cls, kind in _KIND.items()}
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "str": str,
    "bool": bool,
    "dict[str, Any] | None": (dict, type(None)),
    "dict[str, dict[str, int]]": dict,
}


def encode(msg: Message) -> bytes:
    body = {"type": _KIND[type(msg)].value, **asdict(msg)}
    line = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ValueError("config stream message too large")
    return line


def decode(line: bytes) -> Message:
    """One message from one line (with or without its LF); StreamError on anything else."""
    if len(line) > MAX_LINE:
        raise StreamError(f"message longer than {MAX_LINE} bytes")
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamError(f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StreamError("message must be a JSON object")
    try:
        kind = Kind(data.pop("type", None))
    except ValueError:
        raise StreamError("unknown or missing message type") from None
    cls = _CLASS[kind]
    names = cls.__dataclass_fields__
    values = {k: v for k, v in data.items() if k in names}  # newer peers may add fields
    for name, spec in names.items():
        if name not in values:
            continue
        expected = _FIELD_TYPES[str(spec.type)]
        value = values[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise StreamError(f"{kind.value}: {name} must be {spec.type}")
    try:
        msg: Message = cls(**values)
    except TypeError as exc:
        raise StreamError(f"{kind.value}: {exc}") from None
    if isinstance(msg, Report):
        for name, figures in msg.slices.items():
            if not isinstance(figures, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in figures.values()
            ):
                raise StreamError(f"report: slice {name!r} figures must be integers")
    return msg


# -- the upgrade handshake --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


def stream_path(namespace: str, pod: str) -> str:
    return f"/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}/config"


def parse_path(target: str) -> tuple[str, str] | None:
    """(namespace, pod) from a stream path, or None."""
    m = _PATH.match(target)
    return (m.group("ns"), m.group("pod")) if m else None


def encode_request(host: str, namespace: str, pod: str, token: str) -> bytes:
    if any(c in token for c in "\r\n") or not token:
        raise ValueError("token must be one non-empty line")
    lines = [
        f"GET {stream_path(namespace, pod)} HTTP/1.1",
        f"Host: {host}",
        f"Authorization: Bearer {token}",
        f"Upgrade: {PROTOCOL}",
        "Connection: Upgrade",
        "User-Agent: backdial-acceptor",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _head(head: bytes, response: bool) -> http1.Head:
    if len(head) > MAX_HEAD:
        raise StreamError("head too large")
    try:
        parsed = http1.parse_head(head, response)
    except http1.HeadError as exc:
        raise StreamError(f"bad head: {exc}") from None
    if parsed.version != "1.1":
        raise StreamError(f"HTTP/{parsed.version}: only HTTP/1.1")
    return parsed


def parse_request(head: bytes) -> Request:
    parsed = _head(head, response=False)
    return Request(parsed.method, parsed.target, parsed.fields)


def bearer_token(req: Request) -> str | None:
    scheme, _, token = req.header("authorization").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def wants_upgrade(req: Request) -> bool:
    connection = http1.connection_tokens([req.header("connection").encode("latin-1")])
    return req.header("upgrade").lower() == PROTOCOL and b"upgrade" in connection


def encode_response(status: int, message: str = "") -> bytes:
    """101 to switch protocols, or an error with a one-line JSON body."""
    line = http1.status_line(status)
    if status == 101:
        return line + f"Upgrade: {PROTOCOL}\r\nConnection: Upgrade\r\n\r\n".encode()
    reason = http1.REASONS.get(status, b"Error").decode("ascii")
    body = json.dumps({"error": message or reason}).encode() + b"\n"
    head = (
        line
        + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
        + http1.CONNECTION_LINE[http1.ConnMode.CLOSE]
    )
    if status == 401:
        head += b'WWW-Authenticate: Bearer realm="backdial"\r\n'
    return head + b"\r\n" + body


def parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    parsed = _head(head, response=True)
    if parsed.status == 101 and parsed.header("upgrade").lower() != PROTOCOL:
        raise StreamError("the server switched to another protocol")
    return parsed.status, parsed.fields


def error_message(body: bytes) -> str:
    """The ``error`` of an error response body (or the body itself, shortened)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])[:200]
    return str(data)[:200]


class ReportPacer:
    """When the acceptor sends a REPORT: at most every ``interval`` while the figures
    change, and at least every ``KEEPALIVE`` seconds as a heartbeat."""

    def __init__(self, interval: float = REPORT_INTERVAL, keepalive: float = KEEPALIVE) -> None:
        self.interval = interval
        self.keepalive = keepalive
        self.last: Report | None = None
        self.sent_at = float("-inf")

    def due(self, report: Report, now: float) -> bool:
        age = now - self.sent_at
        if age >= self.keepalive or (report != self.last and age >= self.interval):
            self.last = report
            self.sent_at = now
            return True
        return False

    def reset(self) -> None:
        self.last = None
        self.sent_at = float("-inf")
