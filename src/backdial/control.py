"""Control protocol (sidecar worker <-> acceptor), sans-IO.

The transport is a UNIX ``SOCK_SEQPACKET`` socket, so every record arrives
whole and file descriptors travel with the record that names them.  A record
is two header bytes (protocol version, message type) followed by one UTF-8
JSON object.  ``docs/protocol.md`` specifies the records; this module only
maps between bytes and the dataclasses below.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

VERSION = 1
# Backwards-compatible additions within VERSION 1, announced in HELLO by the worker and in
# CONFIG by the acceptor (docs/protocol.md 2.5):
# 2 = a RECALL names the slice whose sessions must come back;
# 3 = ASK / REFUSE: a request that may not wait gets a session only if one can be had now
#     (GRANT ``asked``, RECALL ``now``, RELEASE ``answers``, CONFIG ``revision``).
REVISION = 3
ASK_REVISION = 3  # the first revision that speaks ASK / REFUSE
MAX_RECORD = 1 << 20  # CONFIG carries the slice table; everything else is tiny
MAX_FDS = 64  # sessions per GRANT record (well under the kernel's SCM_MAX_FD)
MAX_WANT = 1_000_000  # a WANT count can never exceed the largest queue.maxWaiting
MAX_NAME = 256  # service and slice names (wire values are at most 128 characters)
MAX_STATS = 4096  # counters in one STATS record


class Kind(IntEnum):
    HELLO = 1  # w->a  worker introduces itself
    CONFIG = 2  # a->w  slices, routes, limits (after HELLO and on every reload)
    WANT = 3  # w->a  absolute number of local waiters per (service, slice)
    GRANT = 4  # a->w  leases, one fd per entry
    RELEASE = 5  # w->a  give leases back: idle (reusable), broken or retired
    RECALL = 6  # a->w  please give back n sessions of a service (and slice) when idle
    LISTEN = 7  # w->a  ask for the shared client listening socket
    LISTENER = 8  # a->w  the listening socket (one fd)
    ERROR = 9  # a->w  a request could not be served
    STATS = 10  # w->a  worker counters for exact cross-process metrics
    ASK = 11  # w->a  n requests that may not wait: a session only if one can be had now
    REFUSE = 12  # a->w  n ASK units could not be served now


class ProtocolError(Exception):
    """A record that does not follow docs/protocol.md."""


class ReleaseState(StrEnum):
    """How a worker gives a session back (RELEASE) or finds an idle one gone."""

    IDLE = "idle"  # clean and reusable
    BROKEN = "broken"  # in an unknown state: close it
    RETIRED = "retired"  # the service gave it back (RETIRE line or Connection: close)


class Rejection(StrEnum):
    """Why a worker answered a request 503 without a session (STATS, metric label)."""

    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    DRAINING = "draining"


class ErrorCode(StrEnum):
    """Machine-readable reason of an ERROR record."""

    LISTEN = "listen"  # the acceptor cannot bind the requested client listener


# What a worker waits for: (service as the worker asked for it, "" = the default
# service; slice).  WANT counts and the acceptor's wait queue are keyed by it.
WantKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    name: str = ""
    revision: int = 1  # the worker's REVISION; absent = 1 (a worker older than the field)


@dataclass(frozen=True, slots=True)
class ConfigMsg:
    generation: int
    config: dict[str, Any]
    worker: int  # id the acceptor gave this worker
    workers: int  # connected workers, for per-worker queue bounds
    index: int  # this worker's position among them (0-based)
    revision: int = 1  # the acceptor's REVISION; absent = an acceptor that does not send it


@dataclass(frozen=True, slots=True)
class Want:
    service: str
    slice: str
    n: int


@dataclass(frozen=True, slots=True)
class Granted:
    """One session in a GRANT record (its descriptor travels with the record)."""

    session: int
    service: str  # the service the session belongs to
    slice: str
    registrant: int
    requested: str = ""  # the service key the worker asked under ("" = default service)
    prefetch: bool = False  # an extra session, not one that served a WANT unit
    asked: bool = False  # answers one ASK unit, not a WANT unit (revision 3)


@dataclass(frozen=True, slots=True)
class Grant:
    leases: list[Granted]


@dataclass(frozen=True, slots=True)
class Released:
    session: int
    state: ReleaseState


@dataclass(frozen=True, slots=True)
class Release:
    sessions: list[Released]
    answers: int = 0  # RECALL records with ``now`` this RELEASE answers (revision 3)


@dataclass(frozen=True, slots=True)
class Recall:
    service: str
    n: int
    slice: str = ""  # the slice the sessions are leased for; "" = any (revision 1)
    now: bool = False  # only sessions idle now, owe nothing, answer at once (revision 3)


@dataclass(frozen=True, slots=True)
class Ask:
    """*n* requests of (service, slice) that may not wait: each wants a session only if
    one can be had now (answered by GRANT entries with ``asked`` and/or REFUSE)."""

    service: str
    slice: str
    n: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """*n* ASK units of (service, slice) that could not be served now."""

    service: str
    slice: str
    n: int


@dataclass(frozen=True, slots=True)
class Listen:
    address: str


@dataclass(frozen=True, slots=True)
class Listener:
    address: str


@dataclass(frozen=True, slots=True)
class Error:
    code: str  # an ErrorCode; a code this version does not know is logged, not refused
    message: str


@dataclass(frozen=True, slots=True)
class Stats:
    counters: dict[str, float] = field(default_factory=dict)


Message = (
    Hello
    | ConfigMsg
    | Want
    | Grant
    | Release
    | Recall
    | Listen
    | Listener
    | Error
    | Stats
    | Ask
    | Refuse
)

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
    Ask: Kind.ASK,
    Refuse: Kind.REFUSE,
}
_CLASS = {kind: cls for cls, kind in _KIND.items()}


def kind_of(msg: Message) -> Kind:
    """The record type of *msg* (for logs and metric labels)."""
    return _KIND[type(msg)]


def encode(msg: Message) -> bytes:
    body = json.dumps(_wire(msg), separators=(",", ":")).encode()
    record = bytes((VERSION, kind_of(msg))) + body
    if len(record) > MAX_RECORD:
        raise ValueError("control record too large")
    return record


def _wire(msg: Message) -> dict[str, Any]:
    """The JSON object of *msg*.  Revision-3 fields at their default are left out, so a
    record that does not use them is byte for byte what an older peer sends."""
    data = asdict(msg)
    if isinstance(msg, Grant):
        for entry in data["leases"]:
            if not entry["asked"]:
                del entry["asked"]
    elif isinstance(msg, Recall) and not msg.now:
        del data["now"]
    elif isinstance(msg, Release) and not msg.answers:
        del data["answers"]
    return data


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
        return Grant([Granted(**_fields(e, Granted)) for e in data["leases"]])
    if kind is Kind.RELEASE:
        items = []
        for e in data["sessions"]:
            fields = _fields(e, Released)
            fields["state"] = ReleaseState(fields["state"])  # ValueError names the bad state
            items.append(Released(**fields))
        answers = data.get("answers", 0)
        if isinstance(answers, bool) or not isinstance(answers, int):
            raise TypeError("answers must be int")
        if not 0 <= answers <= MAX_WANT:
            raise ValueError(f"release answers must be 0..{MAX_WANT}")
        return Release(items, answers)
    cls = _CLASS[kind]
    msg: Message = cls(**_fields(data, cls))
    if isinstance(msg, Want):
        if not 0 <= msg.n <= MAX_WANT:
            raise ValueError(f"want n must be 0..{MAX_WANT}")
        if len(msg.service) > MAX_NAME or len(msg.slice) > MAX_NAME:
            raise ValueError(f"want names longer than {MAX_NAME}")
    elif isinstance(msg, Recall | Ask | Refuse):
        what = kind.name.lower()
        if not 0 < msg.n <= MAX_WANT:
            raise ValueError(f"{what} n must be 1..{MAX_WANT}")
        if len(msg.service) > MAX_NAME or len(msg.slice) > MAX_NAME:
            raise ValueError(f"{what} names longer than {MAX_NAME}")
    elif isinstance(msg, Hello | ConfigMsg):
        if msg.revision < 1:
            raise ValueError(f"{kind.name.lower()} revision must be >= 1")
    elif isinstance(msg, Stats):
        _check_counters(msg.counters)
    return msg


def _check_counters(counters: Any) -> None:
    """STATS values feed exported counters: string keys, finite non-negative numbers."""
    if not isinstance(counters, dict):
        raise TypeError("counters must be an object")
    if len(counters) > MAX_STATS:
        raise ValueError(f"more than {MAX_STATS} counters")
    for key, value in counters.items():
        if len(key) > MAX_NAME:
            raise ValueError(f"counter name longer than {MAX_NAME}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"counter {key[:40]!r} must be a finite number >= 0")


_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "str": str,
    "float": (int, float),
    "ReleaseState": str,
}


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
