"""The traffic policy: slices, routes and limits (the acceptor's config file).

Pydantic models are the single source of truth for the file format.  The
acceptor loads and validates the file; sidecar workers receive the same
document over the control socket and parse it with the same models, so both
sides always agree on slices and routes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_NAME = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


def parse_duration(value: Any) -> float:
    """'2s', '500ms', '1.5', '1m' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("duration must be a number or a string like '2s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
        seconds = float(m.group(1)) * scale
    else:
        raise ValueError(f"invalid duration {value!r}; use e.g. '2s' or '500ms'")
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Match(_Model):
    """Every field given must match (AND); within a list, any entry matches."""

    cidrs: list[str] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)  # name -> regex (search)
    user_agent: str | None = Field(default=None, alias="userAgent")  # regex (search)
    path_prefixes: list[str] = Field(default_factory=list, alias="pathPrefixes")

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid CIDR {cidr!r}: {exc}") from None
        return value

    @field_validator("user_agent")
    @classmethod
    def _ua(cls, value: str | None) -> str | None:
        if value is not None:
            _compile(value)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"invalid header name {name!r}")
            _compile(pattern)
        return {k.lower(): v for k, v in value.items()}

    @field_validator("path_prefixes")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith("/"):
                raise ValueError(f"path prefix {prefix!r} must start with '/'")
        return value


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None


class Queue(_Model):
    max_waiting: int = Field(default=100, ge=0, le=1_000_000, alias="maxWaiting")
    timeout: Duration = 1.0


class Slice(_Model):
    name: str = Field(pattern=_NAME)
    match: Match | list[Match] | None = None  # None: the default slice
    share: int = Field(ge=0, le=100)
    borrow: bool = True
    queue: Queue = Field(default_factory=Queue)

    def rules(self) -> list[Match]:
        if self.match is None:
            return []
        return self.match if isinstance(self.match, list) else [self.match]


class Route(_Model):
    name: str = Field(pattern=_NAME)
    service: str = Field(pattern=r"^[A-Za-z0-9._~:@+-]{1,128}$")
    host: str | None = None  # exact Host match (port ignored), case-insensitive
    path_prefix: str = Field(default="/", alias="pathPrefix")

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("pathPrefix must start with '/'")
        return value


class Limits(_Model):
    preamble_timeout: Duration = Field(default=5.0, alias="preambleTimeout")
    max_sessions: int = Field(default=4096, ge=1, alias="maxSessions")
    max_sessions_per_registrant: int = Field(default=1024, ge=1, alias="maxSessionsPerRegistrant")
    lease_prefetch: int = Field(default=8, ge=0, le=64, alias="leasePrefetch")
    lease_idle_release: Duration = Field(default=2.0, alias="leaseIdleRelease")
    retry_after: int = Field(default=1, ge=0, le=3600, alias="retryAfter")
    # Service names are metric labels: bound how many exist and forget unused ones.
    max_services: int = Field(default=256, ge=1, le=100_000, alias="maxServices")
    forget_services_after: Duration = Field(default=60.0, alias="forgetServicesAfter")


class Policy(_Model):
    """The whole config file."""

    version: int = 1
    slices: list[Slice] = Field(
        default_factory=lambda: [Slice(name="default", share=100, queue=Queue())]
    )
    routes: list[Route] = Field(default_factory=list)
    default_service: str | None = Field(default=None, alias="defaultService")
    tokens: list[str] = Field(default_factory=list)  # empty: no token required
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        if self.version != 1:
            raise ValueError(f"unsupported config version {self.version}; expected 1")
        names = [s.name for s in self.slices]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate slice names in {names}")
        defaults = [s.name for s in self.slices if s.match is None]
        if len(defaults) != 1:
            raise ValueError(
                f"exactly one slice must have no 'match' (the default slice); found {defaults}"
            )
        total = sum(s.share for s in self.slices)
        if total != 100:
            raise ValueError(f"slice shares must add up to 100, not {total}")
        routes = [r.name for r in self.routes]
        if len(set(routes)) != len(routes):
            raise ValueError(f"duplicate route names in {routes}")
        return self

    @property
    def default_slice(self) -> str:
        return next(s.name for s in self.slices if s.match is None)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class PolicyError(Exception):
    """A config that cannot be used; the message is one line for the operator."""

    def __init__(self, message: str) -> None:
        # Keys and values from the file end up in the message: keep it one printable line.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


def validation_line(exc: ValidationError, source: str) -> str:
    """One line naming the first invalid field of *source* (and how many more there are)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def policy_from_data(data: Any, source: str = "config") -> Policy:
    try:
        return Policy.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise PolicyError(validation_line(exc, source)) from None


def load_policy(path: str | Path) -> Policy:
    """Read a YAML or JSON file; raises PolicyError with one clear line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # found by tests/shared/test_fuzz_protocols.py
        raise PolicyError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PolicyError(f"{path}: not valid YAML: {where}{problem}") from None
    return policy_from_data(data, str(path))
