"""Probes and lifecycle handlers as data: parsing, thresholds and scheduling (pure).

A :class:`Handler` is what a probe or a ``preStop`` hook does (``httpGet``, ``tcpSocket``,
``exec``, ``sleep``); a :class:`ProbeSpec` adds timing and thresholds; a
:class:`ProbeTracker` turns single results into the probe's verdict the way the kubelet
does (``successThreshold`` consecutive successes / ``failureThreshold`` failures).
``handlers.py`` executes handlers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from .plan import ConfigError, Obj


class ProbeKind(enum.Enum):
    STARTUP = "startup"
    READINESS = "readiness"
    LIVENESS = "liveness"


class Action(enum.Enum):
    HTTP = "httpGet"
    TCP = "tcpSocket"
    EXEC = "exec"
    SLEEP = "sleep"
    GRPC = "grpc"


@dataclass(frozen=True)
class Handler:
    """One probe or hook action, with its port resolved to a number."""

    action: Action
    host: str = ""  # empty: the pod IP
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    seconds: float = 0.0


def _port(value: object, ports: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    if text in ports:
        return ports[text]
    raise ConfigError(f"port {text!r} is not a named port of the container")


def parse_handler(raw: Obj, ports: Mapping[str, int]) -> Handler:
    """The action of a probe or lifecycle hook; :class:`ConfigError` if there is none."""
    if "httpGet" in raw:
        http = raw["httpGet"]
        return Handler(
            Action.HTTP,
            host=http.get("host") or "",
            port=_port(http.get("port", 80), ports),
            path=http.get("path") or "/",
            scheme=(http.get("scheme") or "HTTP").upper(),
            headers=tuple((h["name"], h["value"]) for h in http.get("httpHeaders") or []),
        )
    if "tcpSocket" in raw:
        tcp = raw["tcpSocket"]
        return Handler(Action.TCP, host=tcp.get("host") or "", port=_port(tcp["port"], ports))
    if "exec" in raw:
        return Handler(Action.EXEC, command=tuple(raw["exec"].get("command") or ()))
    if "sleep" in raw:
        return Handler(Action.SLEEP, seconds=float(raw["sleep"]["seconds"]))
    if "grpc" in raw:
        return Handler(Action.GRPC, port=_port(raw["grpc"]["port"], ports))
    raise ConfigError(f"no handler in {sorted(raw)}")


@dataclass(frozen=True)
class ProbeSpec:
    """A probe: handler, timing and thresholds (Kubernetes defaults)."""

    kind: ProbeKind
    handler: Handler
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def parse_probe(kind: ProbeKind, raw: Obj, ports: Mapping[str, int]) -> ProbeSpec:
    """A probe from its spec; liveness and startup probes need ``successThreshold`` 1."""
    return ProbeSpec(
        kind=kind,
        handler=parse_handler(raw, ports),
        initial_delay=float(raw.get("initialDelaySeconds") or 0),
        period=float(raw.get("periodSeconds") or 10),
        timeout=float(raw.get("timeoutSeconds") or 1),
        success_threshold=int(raw.get("successThreshold") or 1),
        failure_threshold=int(raw.get("failureThreshold") or 3),
    )


def first_run_delay(spec: ProbeSpec) -> float:
    """Seconds after the container (or, for liveness/readiness, its startup) until the
    first run."""
    return spec.initial_delay


def next_run(last_started: float, spec: ProbeSpec, now: float) -> float:
    """Monotonic time of the next run: one period after the last one started, never in
    the past (a run that took longer than a period is followed at once)."""
    return max(now, last_started + spec.period)


@dataclass
class ProbeTracker:
    """Consecutive results → verdict. ``result`` is None until the first verdict."""

    spec: ProbeSpec
    successes: int = 0
    failures: int = 0
    result: bool | None = field(default=None)

    def record(self, ok: bool) -> bool:
        """Count one result; True if the verdict changed."""
        before = self.result
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.spec.success_threshold:
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.spec.failure_threshold:
                self.result = False
        return self.result is not before
