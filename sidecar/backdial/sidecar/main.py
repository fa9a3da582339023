"""``backdial sidecar``: settings, the worker process, admin and graceful stop.

A worker connects to the acceptor's control socket, takes the shared client
listening socket from it, and serves clients with the proxy protocol.  On
SIGTERM it stops accepting (the socket stays open in the acceptor and in any
new sidecar, so no connection is refused), lets in-flight requests finish
within ``--drain-timeout``, gives its leases back, and exits.

``/v1/drain`` (the injected ``preStop`` hook) runs the pod-termination
sequence of ``drain.py`` instead: quiet period, stop accepting, finish.  On a
TCP admin address it needs the ``X-Backdial-Drain-Token`` header to match
``BACKDIAL_DRAIN_TOKEN``; a UNIX admin socket (the supervisor's workers) is
trusted by its file permissions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric

from backdial.adminhttp import AdminRequest, AdminResponse, start_admin
from backdial.metrics import gauge, registry
from backdial.runtime import ArgParser, ConfigError, env, fail, parse_hostport, run, setup_logging
from backdial.sidecar.appprobe import AppProber
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.drain import Drainer, drain_allowed
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.liveness import Liveness
from backdial.sidecar.proxy import make_protocol_factory
from backdial.sidecar.sessionconn import wrap_lease
from backdial.sidecar.stats import ProxyStats
from backdial.sidecar.supervisor import Supervisor
from backdial.trust import parse_networks

log = logging.getLogger("backdial.sidecar")


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    run_dir: Path
    listen: str
    admin: tuple[str, int | str]
    workers: int
    worker_name: str
    drain_timeout: float
    drain_quiet_period: float
    drain_token: str
    stats_interval: float
    max_disconnected: float
    max_loop_lag: float
    proxy: ProxySettings
    log_level: str


def _size(value: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    v = value.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(v[-1:], 1)
    number = v[:-1] if v[-1:] in units else v
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {value!r}; use e.g. 1048576, 512k, 1m")
    return int(number) * scale


def parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="backdial sidecar",
        description="HTTP/1.1 proxy that relays client requests over leased sessions.",
    )
    p.add_argument(
        "--run-dir",
        default=env("RUN_DIR", "/var/run/backdial"),
        help="directory holding the acceptor's control.sock (env BACKDIAL_RUN_DIR)",
    )
    p.add_argument(
        "--listen",
        default=env("LISTEN", "0.0.0.0:8080"),
        help="client HOST:PORT; the acceptor binds it and hands it over "
        "(env BACKDIAL_LISTEN; default 0.0.0.0:8080)",
    )
    p.add_argument(
        "--admin",
        default=env("SIDECAR_ADMIN", "127.0.0.1:9902"),
        help="HOST:PORT or unix:PATH for /metrics, /healthz, /readyz, /v1/state "
        "(env BACKDIAL_SIDECAR_ADMIN; default 127.0.0.1:9902); also /v1/drain and "
        "/v1/app-probe (docs/injection.md)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=env("WORKERS", "1"),
        help="worker processes sharing the listening socket (env BACKDIAL_WORKERS; default 1)",
    )
    p.add_argument("--worker-name", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=env("DRAIN_TIMEOUT", "30"),
        help="seconds SIGTERM (or /v1/drain) waits for in-flight and queued requests "
        "(env BACKDIAL_DRAIN_TIMEOUT; default 30)",
    )
    p.add_argument(
        "--drain-quiet-period",
        type=float,
        default=env("DRAIN_QUIET_PERIOD", "5"),
        help="on /v1/drain, seconds to keep serving while not ready, before it stops "
        "accepting (env BACKDIAL_DRAIN_QUIET_PERIOD; default 5)",
    )
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        default=env("PROXY_PROTOCOL", "") in ("1", "true"),
        help="expect a PROXY protocol v1/v2 header on every client connection; its address "
        "is used only from --trusted-proxies (env BACKDIAL_PROXY_PROTOCOL=1)",
    )
    p.add_argument(
        "--trusted-proxies",
        default=env("TRUSTED_PROXIES", ""),
        help="comma-separated CIDRs of load balancers whose PROXY header, X-Forwarded-For, "
        "Forwarded and X-Real-IP are believed; from any other peer they are replaced by "
        "the connecting address (env BACKDIAL_TRUSTED_PROXIES; default: trust nobody)",
    )
    p.add_argument(
        "--max-request-body",
        type=_size,
        default="1m",
        help="request bodies up to this size are kept in memory before a session is leased "
        "(default 1m)",
    )
    p.add_argument(
        "--max-request-body-stream",
        type=_size,
        default="64m",
        help="larger bodies up to this size are spooled to a temp file before a session is "
        "leased (streamed under a lease with --request-spool-total 0); beyond it 413 "
        "(default 64m)",
    )
    p.add_argument(
        "--request-memory-total",
        type=_size,
        default="64m",
        help="request body bytes all connections of a worker keep in memory; beyond it bodies "
        "go to spool files (default 64m)",
    )
    p.add_argument(
        "--request-spool-total",
        type=_size,
        default="1g",
        help="request body bytes all connections of a worker keep in spool files; beyond "
        "memory and this, 503 (default 1g; 0 turns spooling off)",
    )
    p.add_argument(
        "--body-min-rate",
        type=_size,
        default="1k",
        help="bytes per second a request body must keep arriving at, measured every 10 s once "
        "the request timeout has passed; below it 408 (default 1k; 0 off)",
    )
    p.add_argument(
        "--max-header-bytes",
        type=_size,
        default="64k",
        help="request head limit; beyond it 431 (default 64k)",
    )
    p.add_argument(
        "--response-buffer",
        type=_size,
        default="1m",
        help="response bytes drained from a session before the client reads them (default 1m)",
    )
    p.add_argument(
        "--response-spill-max",
        type=_size,
        default="1g",
        help="beyond --response-buffer, up to this many response bytes per connection wait "
        "in a temporary file so the session is released; 0: hold the session instead "
        "(default 1g)",
    )
    p.add_argument(
        "--spill-dir",
        default=env("SPILL_DIR", "") or "",
        help="directory for those temporary files and for spooled request bodies, unlinked "
        "at creation (env BACKDIAL_SPILL_DIR; default $TMPDIR or /tmp)",
    )
    p.add_argument(
        "--upstream-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a response to start; then 504 (default 60)",
    )
    p.add_argument(
        "--client-idle-timeout",
        type=float,
        default=75.0,
        help="seconds a keep-alive client connection may sit idle (default 75)",
    )
    p.add_argument(
        "--max-disconnected",
        type=float,
        default=env("MAX_DISCONNECTED", "30"),
        help="seconds without a control connection after which /healthz fails (the worker "
        "keeps reconnecting meanwhile; env BACKDIAL_MAX_DISCONNECTED; default 30)",
    )
    p.add_argument(
        "--max-loop-lag",
        type=float,
        default=env("MAX_LOOP_LAG", "5"),
        help="an event-loop stall longer than this fails /healthz for 30 s "
        "(env BACKDIAL_MAX_LOOP_LAG; default 5)",
    )
    p.add_argument(
        "--fd-reserve",
        type=int,
        default=env("FD_RESERVE", "128"),
        help="file descriptors kept free for sessions, control and spool files; client "
        "connections beyond the limit minus this get 503 (env BACKDIAL_FD_RESERVE; default 128)",
    )
    p.add_argument("--stats-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    return p


def settings_from(argv: list[str]) -> SidecarSettings:
    ns = parser().parse_args(argv)
    if ns.workers < 1 or ns.workers > 64:
        raise ConfigError("--workers must be between 1 and 64")
    parse_hostport(ns.listen, "--listen")
    if ns.admin.startswith("unix:"):
        admin: tuple[str, int | str] = ("unix", ns.admin[5:])
    else:
        admin = parse_hostport(ns.admin, "--admin")
    if ns.drain_timeout < 0 or ns.drain_quiet_period < 0:
        raise ConfigError("--drain-timeout and --drain-quiet-period must be >= 0")
    if ns.max_request_body > ns.max_request_body_stream:
        raise ConfigError("--max-request-body must not exceed --max-request-body-stream")
    try:
        trusted = parse_networks(ns.trusted_proxies, "--trusted-proxies")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ns.proxy_protocol and not trusted:
        raise ConfigError("--proxy-protocol needs --trusted-proxies (the load balancers' CIDRs)")
    proxy = ProxySettings(
        max_request_body=ns.max_request_body,
        max_request_body_stream=ns.max_request_body_stream,
        request_memory_total=ns.request_memory_total,
        request_spool_total=ns.request_spool_total,
        body_min_rate=ns.body_min_rate,
        fd_reserve=ns.fd_reserve,
        max_header_bytes=ns.max_header_bytes,
        response_buffer=ns.response_buffer,
        response_spill_max=ns.response_spill_max,
        spill_dir=ns.spill_dir,
        upstream_timeout=ns.upstream_timeout,
        client_idle_timeout=ns.client_idle_timeout,
        proxy_protocol=ns.proxy_protocol,
        trusted_proxies=tuple(str(net) for net in trusted),
    )
    return SidecarSettings(
        run_dir=Path(ns.run_dir),
        listen=ns.listen,
        admin=admin,
        workers=ns.workers,
        worker_name=ns.worker_name or f"pid-{os.getpid()}",
        drain_timeout=ns.drain_timeout,
        drain_quiet_period=ns.drain_quiet_period,
        drain_token=env("DRAIN_TOKEN", "") or "",
        stats_interval=ns.stats_interval,
        max_disconnected=ns.max_disconnected,
        max_loop_lag=ns.max_loop_lag,
        proxy=proxy,
        log_level=ns.log_level,
    )


class WorkerAdmin:
    def __init__(
        self,
        pool: LeasePool,
        stats: ProxyStats,
        name: str,
        token: str = "",
        tcp: bool = True,
        liveness: Liveness | None = None,
    ) -> None:
        self.pool, self.stats, self.name = pool, stats, name
        self.token, self.tcp = token, tcp
        self.liveness = liveness or Liveness(pool, None, float("inf"), float("inf"))
        self.draining = False
        self.drainer: Drainer | None = None
        self.prober = AppProber(pool)
        self.metrics = registry(self.families)

    def families(self) -> Iterator[Metric]:
        yield from self.stats.families()
        yield from self.liveness.families()
        pool = self.pool
        yield gauge(
            "backdial_sidecar_leases_held",
            "Sessions this worker holds (busy + idle).",
            [({}, float(len(pool.held)))],
        )
        yield gauge(
            "backdial_sidecar_leases_busy",
            "Sessions carrying a request now.",
            [({}, len(pool.busy))],
        )
        waiting: collections.Counter[str] = collections.Counter()
        for (_, slice_name), queue in pool.waiters.items():
            waiting[slice_name] += len(queue)
        yield gauge(
            "backdial_sidecar_requests_waiting",
            "Requests waiting in this worker for a session, by slice.",
            [({"slice": name}, float(n)) for name, n in sorted(waiting.items())],
        )

    def ready(self) -> bool:
        return (
            not self.draining
            and not (self.drainer is not None and self.drainer.started)
            and self.pool.connected.is_set()
            and (self.pool.registered > 0 or bool(self.pool.held))
            and self.liveness.unready() is None
        )

    async def __call__(self, req: AdminRequest) -> AdminResponse:
        if req.path == "/metrics":
            return AdminResponse.exposition(self.metrics, req)
        if req.path == "/healthz":
            wedged = self.liveness.health()
            return (
                AdminResponse.text(503, wedged + "\n")
                if wedged
                else AdminResponse.text(200, "ok\n")
            )
        if req.path == "/readyz":
            ok = self.ready()
            return AdminResponse.text(200 if ok else 503, "ready\n" if ok else "not ready\n")
        if req.path == "/v1/app-probe":
            q = {k: v[-1] for k, v in req.query.items()}
            ok, why = await self.prober.check(q.get("path", "/"), q.get("host", ""), "tcp" in q)
            return AdminResponse.text(200 if ok else 503, why + "\n")
        if req.path == "/v1/drain":
            if req.method not in ("GET", "POST"):
                return AdminResponse.text(405, "use GET or POST\n")
            if not drain_allowed(req, self.token, self.tcp):
                return AdminResponse.text(403, "drain needs the pod's drain token\n")
            if self.drainer is None:
                return AdminResponse.text(503, "not serving yet\n")
            result = await self.drainer.run()
            return AdminResponse.of_json(200, result.as_dict())
        if req.path == "/v1/state":
            pool = self.pool
            return AdminResponse.of_json(
                200,
                {
                    "worker": self.name,
                    "pid": os.getpid(),
                    "acceptor_worker_id": pool.worker_id,
                    "connected": pool.connected.is_set(),
                    "drain": self.drainer.phase.value if self.drainer else "serving",
                    "registered": pool.registered,
                    "generation": pool.generation,
                    "held": len(pool.held),
                    "held_by_registrant": dict(
                        collections.Counter(str(c.lease.registrant) for c in pool.held.values())
                    ),
                    "busy": len(pool.busy),
                    "idle": {f"{k[0] or '(default)'}/{k[1]}": len(q) for k, q in pool.idle.items()},
                    "waiting": {
                        f"{k[0] or '(default)'}/{k[1]}": len(q) for k, q in pool.waiters.items()
                    },
                },
            )
        return AdminResponse.text(404, "not found\n")


async def serve_worker(cfg: SidecarSettings, stop: asyncio.Event) -> int:
    pool: LeasePool | None = None
    stats = ProxyStats()
    pool = LeasePool(cfg.run_dir, lambda lease: wrap_lease(lease, pool_ref()), cfg.worker_name)

    def pool_ref() -> LeasePool:
        assert pool is not None
        return pool

    pool.start()
    liveness = Liveness(pool, None, cfg.max_disconnected, cfg.max_loop_lag)
    monitor = asyncio.ensure_future(liveness.run())
    admin_api = WorkerAdmin(
        pool, stats, cfg.worker_name, cfg.drain_token, cfg.admin[0] != "unix", liveness
    )
    admin = await start_admin(cfg.admin[0], cfg.admin[1], admin_api)
    try:
        listener = await _listener(pool, cfg.listen, stop)
    except ConnectionError as exc:
        admin.close()
        return fail(str(exc))
    if listener is None:  # stopped before the acceptor answered
        admin.close()
        await pool.close(0)
        return 0
    loop = asyncio.get_running_loop()
    factory, state = make_protocol_factory(pool, cfg.proxy, stats)
    liveness.guard = state.fd_guard
    server = await loop.create_server(factory, sock=listener, backlog=4096)
    log.info(
        "sidecar %s serving http://%s (acceptor %s)",
        cfg.worker_name,
        cfg.listen,
        cfg.run_dir / "control.sock",
    )
    drainer = Drainer(
        server, listener, factory, state, stop, cfg.drain_quiet_period, cfg.drain_timeout
    )
    admin_api.drainer = drainer
    reporter = asyncio.ensure_future(_report(pool, cfg.stats_interval))
    await stop.wait()
    admin_api.draining = True
    if drainer.started:  # the pod is terminating: finish that sequence (SIGTERM cut its quiet)
        await drainer.run()
    else:
        # Graceful stop: no new connections here (others keep the socket open), finish work.
        drainer.discard()
        server.close()
        await state.shutdown(cfg.drain_timeout)
    await pool.close(1.0)
    reporter.cancel()
    monitor.cancel()
    admin.close()
    if cfg.admin[0] == "unix":
        os.unlink(str(cfg.admin[1]))
    return 0


async def _listener(pool: LeasePool, address: str, stop: asyncio.Event) -> socket.socket | None:
    """Ask the acceptor for the shared listening socket, waiting for it to appear."""
    waited = 0
    while not stop.is_set():
        try:
            return await pool.listener(address, wait=5.0)
        except TimeoutError:
            waited += 5
            log.warning("waiting for the acceptor at %s (%ds)", pool.control_path, waited)
        except OSError as exc:
            raise ConnectionError(f"acceptor cannot listen on {address}: {exc}") from None
    return None


async def _report(pool: LeasePool, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        pool.send_stats()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = settings_from(args)
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(cfg.log_level)
    if cfg.workers > 1:
        child_args = _strip(args, ("--workers", "--admin", "--worker-name"))
        sup = Supervisor(
            child_args,
            cfg.workers,
            cfg.run_dir,
            cfg.drain_timeout,
            cfg.drain_quiet_period,
            cfg.drain_token,
        )
        assert isinstance(cfg.admin[1], int), "the supervisor's admin must be TCP"
        admin_tcp = (cfg.admin[0], cfg.admin[1])
        return run(lambda stop: sup.run(admin_tcp, stop))
    return run(lambda stop: serve_worker(cfg, stop))


def _strip(args: list[str], names: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
