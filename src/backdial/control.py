"""Control protocol (sidecar worker <-> acceptor), sans-IO.

The transport is a UNIX ``SOCK_SEQPACKET`` socket, so every record arrives
whole and file descriptors travel with the record that names them.  A record
is two header bytes (protocol version, message type) followed by one UTF-8
JSON object.  ``docs/protocol.md`` specifies the records; this module only
maps between bytes and the dataclasses below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

VERSION = 1
MAX_RECORD = 1 << 20  # CONFIG carries the slice table; everything else is tiny
MAX_FDS = 64  # sessions per GRANT record (well under the kernel's SCM_MAX_FD)


class Kind(IntEnum):
    HELLO = 1  # w->a  worker introduces itself
    CONFIG = 2  # a->w  slices, routes, limits (after HELLO and on every reload)
    WANT = 3  # w->a  absolute number of local waiters per (service, slice)
    GRANT = 4  # a->w  leases, one fd per entry
    RELEASE = 5  # w->a  give leases back: idle (reusable), broken or retired
    RECALL = 6  # a->w  please give back n sessions of a service when idle
    LISTEN = 7  # w->a  ask for the shared client listening socket
    LISTENER = 8  # a->w  the listening socket (one fd)
    ERROR = 9  # a->w  a request could not be served
    STATS = 10  # w->a  worker counters for exact cross-process metrics


class ProtocolError(Exception):
    """A record that does not follow docs/protocol.md."""


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class ConfigMsg:
    generation: int
    config: dict[str, Any]
    worker: int  # id the acceptor gave this worker
    workers: int  # connected workers, for per-worker queue bounds
    index: int  # this worker's position among them (0-based)


@dataclass(frozen=True, slots=True)
class Want:
    service: str
    slice: str
    n: int


@dataclass(frozen=True, slots=True)
class Lease:
    session: int
    service: str  # the service the session belongs to
    slice: str
    registrant: int
    requested: str = ""  # the service key the worker asked under ("" = default service)
    prefetch: bool = False  # an extra session, not one that served a WANT unit


@dataclass(frozen=True, slots=True)
class Grant:
    leases: list[Lease]


@dataclass(frozen=True, slots=True)
class Released:
    session: int
    state: str  # "idle" | "broken" | "retired"


@dataclass(frozen=True, slots=True)
class Release:
    sessions: list[Released]


@dataclass(frozen=True, slots=True)
class Recall:
    service: str
    n: int


@dataclass(frozen=True, slots=True)
class Listen:
    address: str


@dataclass(frozen=True, slots=True)
class Listener:
    address: str


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Stats:
    counters: dict[str, float] = field(default_factory=dict)


Message = Hello | ConfigMsg | Want | Grant | Release | Recall | Listen | Listener | Error | Stats

_KIND: dict[type[Any], Kind] = {
    Hello: Kind.HELLO,
    ConfigMsg: Kind.CONFIG,
    Want: Kind.WANT,
    Grant: Kind.GRANT,
    Release: Kind.RELEASE,
    Recall: Kind.RECALL,
    Listen: Kind.LISTEN,
    Listener: Kind.LISTENER,
    Error: Kind.ERROR,
    Stats: Kind.STATS,
}
_CLASS = {kind: cls for cls, kind in _KIND.items()}


def encode(msg: Message) -> bytes:
    body = json.dumps(asdict(msg), separators=(",", ":")).encode()
    record = bytes((VERSION, _KIND[type(msg)])) + body
    if len(record) > MAX_RECORD:
        raise ValueError("control record too large")
    return record


def decode(record: bytes) -> Message:
    """Parse one record; raises ProtocolError with a precise reason."""
    if len(record) < 3:
        raise ProtocolError("record shorter than 3 bytes")
    if record[0] != VERSION:
        raise ProtocolError(f"unsupported control version {record[0]}")
    try:
        kind = Kind(record[1])
    except ValueError:
        raise ProtocolError(f"unknown message type {record[1]}") from None
    try:
        data = json.loads(record[2:])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{kind.name}: body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind.name}: body must be a JSON object")
    try:
        return _build(kind, data)
    except (TypeError, KeyError, ValueError) as exc:
        raise ProtocolError(f"{kind.name}: bad fields: {exc}") from None


def _build(kind: Kind, data: dict[str, Any]) -> Message:
    if kind is Kind.GRANT:
        return Grant([Lease(**_fields(e, Lease)) for e in data["leases"]])
    if kind is Kind.RELEASE:
        items = [Released(**_fields(e, Released)) for e in data["sessions"]]
        for item in items:
            if item.state not in ("idle", "broken", "retired"):
                raise ValueError(f"release state {item.state!r}")
        return Release(items)
    cls = _CLASS[kind]
    msg: Message = cls(**_fields(data, cls))
    if isinstance(msg, Want) and msg.n < 0:
        raise ValueError("want n must be >= 0")
    return msg


_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "float": (int, float)}


def _fields(data: Any, cls: type[Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError("expected an object")
    names = cls.__dataclass_fields__
    # Unknown fields are ignored so a newer peer can add optional ones.
    out = {k: v for k, v in data.items() if k in names}
    for name, f in names.items():
        if name in out:
            expected: type | tuple[type, ...] | None = _TYPES.get(str(f.type))
            if str(f.type) == "bool" and not isinstance(out[name], bool):
                raise TypeError(f"{name} must be bool")
            if expected is not None and (
                not isinstance(out[name], expected) or isinstance(out[name], bool)
            ):
                raise TypeError(f"{name} must be {f.type}")
    return out
