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

import asyncio
import collections
import logging
import os
import socket
import sys
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from backdial.adminhttp import AdminRequest, AdminResponse, start_admin
from backdial.metrics import gauge, registry
from backdial.options import load
from backdial.runtime import ConfigError, fail, run, setup_logging
from backdial.sidecar.appprobe import AppProber
from backdial.sidecar.config import SidecarSettings
from backdial.sidecar.drain import Drainer, drain_allowed
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.liveness import Liveness
from backdial.sidecar.proxy import make_protocol_factory
from backdial.sidecar.sessionconn import wrap_lease
from backdial.sidecar.stats import ProxyStats
from backdial.sidecar.supervisor import Supervisor

log = logging.getLogger("backdial.sidecar")


def settings_from(argv: list[str]) -> SidecarSettings:
    settings = load(
        SidecarSettings,
        argv,
        prog="backdial sidecar",
        description="HTTP/1.1 proxy that relays client requests over leased sessions. "
        "Every option may also be given as the BACKDIAL_* variable named in its help; "
        "a flag wins over the variable.",
    )
    return settings.named()


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
