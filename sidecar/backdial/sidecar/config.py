"""``backdial sidecar`` settings: every one a flag and a ``BACKDIAL_*`` variable.

``ProxySettings`` are one listener's limits and timeouts (what ``proxy.py``
reads); ``SidecarSettings`` add the process around it (run directory, admin,
workers, drain, liveness).  Both are declared with ``backdial.options``, so
``backdial sidecar --help`` and ``docs/configuration.md`` list every setting
with its variable and default, and a bad value is one line.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path

from backdial.options import (
    choice,
    group,
    hostport,
    integer,
    log_level,
    option,
    path,
    seconds,
    size,
    words,
)
from backdial.runtime import ConfigError
from backdial.sidecar.cpupolicy import CpuPolicy


def cidrs(raw: str) -> tuple[str, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128), normalised."""
    out = []
    for item in words(raw):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    return tuple(out)


def cpu_policy(raw: str) -> CpuPolicy:
    return CpuPolicy(choice(*(p.value for p in CpuPolicy))(raw))


def listen_address(raw: str) -> str:
    """``HOST:PORT``, kept as written: the acceptor holds the listener under this name."""
    hostport(raw)
    return raw


def admin_address(raw: str) -> tuple[str, int | str]:
    """``HOST:PORT``, or ``unix:PATH`` (then ``("unix", PATH)``)."""
    if raw.startswith("unix:"):
        return "unix", str(path(raw[5:]))
    return hostport(raw)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits and timeouts of one listener (sizes in bytes, times in seconds)."""

    max_request_body: int = option(
        "--max-request-body",
        parse=size,
        default="1m",
        help="request bodies up to this size are kept in memory before a session is leased",
    )
    max_request_body_stream: int = option(
        "--max-request-body-stream",
        parse=size,
        default="64m",
        help="larger bodies up to this size are spooled to a temp file before a session is "
        "leased (streamed under a lease with --request-spool-total 0); beyond it 413",
    )
    # Request bodies held by all connections of one worker (spool.py): in memory up to
    # request_memory_total, then in temp files up to request_spool_total; beyond both a
    # fast 503.  request_spool_total = 0 turns spooling off: bodies over max_request_body
    # then stream under a lease, as the session's back-pressure allows.
    request_memory_total: int = option(
        "--request-memory-total",
        parse=size,
        default="64m",
        help="request body bytes all connections of a worker keep in memory; beyond it bodies "
        "go to spool files",
    )
    request_spool_total: int = option(
        "--request-spool-total",
        parse=size,
        default="1g",
        help="request body bytes all connections of a worker keep in spool files; beyond "
        "memory and this, 503 (0 turns spooling off)",
    )
    # A body must keep arriving at body_min_rate bytes/s, measured over each
    # body_rate_window once request_timeout has passed (like mod_reqtimeout MinRate); else 408.
    body_min_rate: int = option(
        "--body-min-rate",
        parse=size,
        default="1k",
        help="bytes per second a request body must keep arriving at, once the request "
        "timeout has passed; below it 408 (0 off)",
    )
    body_rate_window: float = option(
        "--body-rate-window",
        parse=seconds,
        default="10",
        help="seconds over which --body-min-rate is measured",
    )
    # Descriptors kept free for sessions, the control connection, spool files and admin:
    # client connections beyond the process limit minus this get a fast 503 (liveness.py).
    fd_reserve: int = option(
        "--fd-reserve",
        parse=integer(0),
        default="128",
        help="file descriptors kept free for sessions, control and spool files; client "
        "connections beyond the limit minus this get 503",
    )
    # While requests wait for sessions on saturated CPUs, the services' CPU is the
    # bottleneck: under SCHED_BATCH the worker stops preempting them on every wake-up
    # (cpupolicy.py, cpuload.py, docs/engine.md).
    queued_cpu_policy: CpuPolicy = option(
        "--queued-cpu-policy",
        parse=cpu_policy,
        default="auto",
        help="the worker's scheduling policy while requests wait for sessions and its CPUs "
        "have no idle time: batch (SCHED_BATCH, it stops preempting the services on "
        "wake-up), normal, or auto (batch on the native engine, normal on the python "
        "engine); docs/engine.md",
    )
    max_header_bytes: int = option(
        "--max-header-bytes", parse=size, default="64k", help="request head limit; beyond it 431"
    )
    response_buffer: int = option(
        "--response-buffer",
        parse=size,
        default="1m",
        help="response bytes drained from a session before the client reads them",
    )
    # Response bytes all connections of one worker hold in memory for their clients
    # (transport buffers, clientout.py); beyond it they go to spill files, then the session
    # waits.  A connection may always hold clientout.MEMORY_FLOOR (16 KiB) regardless.
    response_memory_total: int = option(
        "--response-memory-total",
        parse=size,
        default="64m",
        help="response bytes all connections of a worker keep in memory for their clients; "
        "beyond it they go to spill files (or the session waits)",
    )
    # Beyond response_buffer, response bytes go to a temporary file (spool.SpoolFile) so the
    # session is released at session speed; 0 disables it (back-pressure holds the session).
    response_spill_max: int = option(
        "--response-spill-max",
        parse=size,
        default="1g",
        help="beyond --response-buffer, up to this many response bytes per connection wait "
        "in a temporary file so the session is released; 0: hold the session instead",
    )
    response_spill_total: int = option(
        "--response-spill-total",
        parse=size,
        default="4g",
        help="response bytes all connections of a worker may park in temporary files",
    )
    spill_dir: str = option(
        "--spill-dir",
        default="",
        help="directory for those temporary files and for spooled request bodies, unlinked "
        "at creation (empty: $TMPDIR or /tmp)",
    )
    upstream_timeout: float = option(
        "--upstream-timeout",
        parse=seconds,
        default="60",
        help="seconds a response may take to start (and to keep flowing); then 504",
    )
    client_idle_timeout: float = option(
        "--client-idle-timeout",
        parse=seconds,
        default="75",
        help="seconds a keep-alive client connection (or a tunnel) may sit idle",
    )
    drain_idle_grace: float = option(
        "--drain-idle-grace",
        parse=seconds,
        default="1",
        help="on a graceful stop, seconds an idle keep-alive client may still send one request",
    )
    request_timeout: float = option(
        "--request-timeout",
        parse=seconds,
        default="30",
        help="seconds to receive one request (head and buffered body); then 408",
    )
    send_timeout: float = option(
        "--send-timeout",
        parse=seconds,
        default="60",
        help="seconds a client may read nothing while its response waits; then it is cut",
    )
    proxy_protocol: bool = option(
        "--proxy-protocol",
        switch=True,
        help="expect a PROXY protocol v1/v2 header on every client connection; its address "
        "is used only from --trusted-proxies",
    )
    # CIDRs whose PROXY header address and X-Forwarded-For/Forwarded/X-Real-IP are believed;
    # from anyone else those are replaced by the connecting address (realip.py).
    trusted_proxies: tuple[str, ...] = option(
        "--trusted-proxies",
        parse=cidrs,
        default="",
        help="comma-separated CIDRs of load balancers whose PROXY header, X-Forwarded-For, "
        "Forwarded and X-Real-IP are believed; from any other peer they are replaced by "
        "the connecting address (empty: trust nobody)",
    )
    via: str = option("--via", default="backdial", help="pseudonym in 'Via: 1.1 <via>'")
    forwarded_proto: str = option(
        "--forwarded-proto",
        parse=choice("http", "https"),
        default="http",
        help="X-Forwarded-Proto and Forwarded proto= sent to services",
    )
    max_retries: int = option(
        "--max-retries",
        parse=integer(0, 10),
        default="2",
        help="retries of an idempotent request whose session failed before any response byte",
    )
    max_pipeline: int = option(
        "--max-pipeline",
        parse=integer(1, 1024),
        default="16",
        help="parsed requests queued per client connection before reading pauses",
    )
    tick: float = option(
        "--timeout-tick", parse=seconds, default="0.25", help="granularity of the timeout sweep"
    )

    def check(self) -> None:
        if self.max_request_body > self.max_request_body_stream:
            raise ConfigError("--max-request-body must not exceed --max-request-body-stream")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ConfigError(
                "--proxy-protocol needs --trusted-proxies (the load balancers' CIDRs)"
            )
        if self.tick <= 0:
            raise ConfigError("--timeout-tick must be > 0")


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    run_dir: Path = option(
        "--run-dir",
        parse=path,
        default="/var/run/backdial",
        help="directory holding the acceptor's control.sock",
    )
    listen: str = option(
        "--listen",
        parse=listen_address,
        default="0.0.0.0:8080",
        help="client HOST:PORT; the acceptor binds it and hands it over",
    )
    admin: tuple[str, int | str] = option(
        "--admin",
        parse=admin_address,
        default="127.0.0.1:9902",
        env="SIDECAR_ADMIN",
        help="HOST:PORT or unix:PATH for /metrics, /healthz, /readyz, /v1/state; also "
        "/v1/drain and /v1/app-probe (docs/injection.md)",
    )
    engine: str = option(
        "--engine",
        parse=choice("auto", "native", "python"),
        default="auto",
        help="relay engine: native (the compiled backdial-engine package), python, or auto "
        "(native when installed); docs/engine.md",
    )
    workers: int = option(
        "--workers",
        parse=integer(1, 64),
        default="1",
        help="worker processes sharing the listening socket",
    )
    worker_name: str = option("--worker-name", default="", env=False, hidden=True, help="")
    drain_timeout: float = option(
        "--drain-timeout",
        parse=seconds,
        default="30",
        help="seconds SIGTERM (or /v1/drain) waits for in-flight and queued requests",
    )
    drain_quiet_period: float = option(
        "--drain-quiet-period",
        parse=seconds,
        default="5",
        help="on /v1/drain, seconds to keep serving while not ready, before it stops accepting",
    )
    drain_token: str = option(
        "--drain-token",
        default="",
        help="token /v1/drain over TCP must present in X-Backdial-Drain-Token (prefer the "
        "variable: flags are visible in the process list)",
    )
    max_disconnected: float = option(
        "--max-disconnected",
        parse=seconds,
        default="30",
        help="seconds without a control connection after which /healthz fails (the worker "
        "keeps reconnecting meanwhile)",
    )
    max_loop_lag: float = option(
        "--max-loop-lag",
        parse=seconds,
        default="5",
        help="an event-loop stall longer than this fails /healthz for 30 s",
    )
    stats_interval: float = option(
        "--stats-interval", parse=seconds, default="1", env=False, hidden=True, help=""
    )
    log_level: str = log_level()
    proxy: ProxySettings = group(ProxySettings)

    def named(self) -> SidecarSettings:
        """With the worker's name filled in (``pid-<pid>`` unless the supervisor named it)."""
        return self if self.worker_name else replace(self, worker_name=f"pid-{os.getpid()}")
