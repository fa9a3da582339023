"""``backdial sidecar``: settings, the worker process and its graceful stop.

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
import contextlib
import logging
import os
import socket
import sys

from backdial.adminhttp import start_admin
from backdial.options import load
from backdial.runtime import ConfigError, fail, run, setup_logging
from backdial.sidecar import engine
from backdial.sidecar.config import SidecarSettings
from backdial.sidecar.cpuload import WINDOW, CpuWatch
from backdial.sidecar.cpupolicy import CpuPolicy
from backdial.sidecar.drain import Drainer
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.liveness import Liveness
from backdial.sidecar.supervisor import Supervisor
from backdial.sidecar.workeradmin import WorkerAdmin

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


async def serve_worker(cfg: SidecarSettings, stop: asyncio.Event) -> int:
    try:
        kind, why = engine.choose(cfg.engine)
    except ConfigError as exc:
        return fail(str(exc))
    worker = engine.worker(kind, cfg.run_dir, cfg.proxy, cfg.worker_name)
    pool, stats = worker.pool, worker.stats
    log.info("sidecar %s: %s engine (%s)", cfg.worker_name, kind.value, why)
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
    factory, state = worker.listen(cfg.proxy)
    liveness.guard = state.fd_guard
    server = await worker.serve(listener)
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
    # Batch while requests wait needs the CPUs' state (cpuload.py): sampled only then.
    batch = cfg.proxy.queued_cpu_policy.resolved(native=kind is engine.Kind.NATIVE)
    watcher = asyncio.ensure_future(_watch_cpu(pool)) if batch is CpuPolicy.BATCH else None
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
    if watcher is not None:
        watcher.cancel()
    admin.close()
    if cfg.admin[0] == "unix":
        # The run directory may be gone already (the pod's emptyDir, a test's tmp dir).
        with contextlib.suppress(FileNotFoundError):
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


async def _watch_cpu(pool: LeasePool) -> None:
    watch = CpuWatch()
    while True:
        pool.cpu_contended(watch.update())
        await asyncio.sleep(WINDOW)


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
    try:
        engine.choose(cfg.engine)  # before any worker starts: a missing engine is one line
    except ConfigError as exc:
        return fail(str(exc))
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
