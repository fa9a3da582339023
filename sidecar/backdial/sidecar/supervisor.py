"""``--workers N``: N worker processes behind one admin endpoint.

Each worker is the same program with ``--workers 1``; they share the client
listening socket the acceptor holds, so the kernel spreads connections over
them.  Workers serve their admin API on a UNIX socket in the run directory;
the supervisor's ``/metrics`` sums the workers' series, so counts are exact
across processes.  A worker that dies is restarted with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from backdial.adminhttp import AdminRequest, AdminResponse, admin_get, start_admin
from backdial.metrics import merge, registry
from backdial.sidecar.drain import drain_allowed

log = logging.getLogger("backdial.sidecar")


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        workers: int,
        run_dir: Path,
        drain: float,
        quiet: float = 0.0,
        token: str = "",
    ) -> None:
        self.argv = argv
        self.count = workers
        self.run_dir = run_dir
        self.drain = drain
        self.quiet = quiet
        self.token = token
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"sidecar-worker-{index}.admin.sock"

    async def _keep(self, index: int, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            args = [
                *self.argv,
                "--workers",
                "1",
                "--admin",
                f"unix:{self.socket_path(index)}",
                "--worker-name",
                f"worker-{index}",
            ]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backdial.cli", "sidecar", *args
            )
            self.procs[index] = proc
            started = time.monotonic()
            code = await proc.wait()
            if stop.is_set():
                return
            if time.monotonic() - started > 10:
                delay = 0.1
            log.error("worker %d exited with %s; restarting in %.1fs", index, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def admin(self, req: AdminRequest) -> AdminResponse:
        if req.path == "/v1/drain":
            return await self._drain(req)
        if req.path == "/v1/app-probe":
            return await self._probe(req)
        results = await asyncio.gather(
            *(admin_get(self.socket_path(i), req.path) for i in range(self.count)),
            return_exceptions=True,
        )
        ok = [r for r in results if isinstance(r, tuple)]
        if req.path == "/metrics":
            # Each worker's text exposition, series summed: counts exact across processes.
            families = merge(body.decode() for status, body in ok if status == 200)
            return AdminResponse.exposition(registry(lambda: families), req)
        if req.path in ("/healthz", "/readyz"):
            # Ready when every worker is; one worker down is not healthy either.
            good = len(ok) == self.count and all(status == 200 for status, _ in ok)
            return AdminResponse.text(200 if good else 503, "ok\n" if good else "not ready\n")
        if req.path == "/v1/state":
            states = [json.loads(b) for status, b in ok if status == 200]
            return AdminResponse.of_json(200, {"workers": states})
        return AdminResponse.text(404, "not found\n")

    async def _probe(self, req: AdminRequest) -> AdminResponse:
        """The app is checked by the first worker that answers (they share its sessions)."""
        target = "/v1/app-probe?" + urlencode(req.query, doseq=True)
        for i in range(self.count):
            try:
                status, body = await admin_get(self.socket_path(i), target)
            except (OSError, TimeoutError, ValueError, IndexError):
                continue
            return AdminResponse.text(status, body.decode(errors="replace"))
        return AdminResponse.text(503, "no worker\n")

    async def _drain(self, req: AdminRequest) -> AdminResponse:
        """Every worker runs the drain sequence at once; answer when all have finished."""
        if not drain_allowed(req, self.token, tcp=True):
            return AdminResponse.text(403, "drain needs the pod's drain token\n")
        budget = self.quiet + self.drain + 5
        results = await asyncio.gather(
            *(admin_get(self.socket_path(i), "/v1/drain", budget) for i in range(self.count)),
            return_exceptions=True,
        )
        done = [json.loads(r[1]) for r in results if isinstance(r, tuple) and r[0] == 200]
        aborted = sum(int(d["aborted"]) for d in done)
        status = 200 if len(done) == self.count else 503
        return AdminResponse.of_json(
            status, {"drained": status == 200, "workers": len(done), "aborted": aborted}
        )

    async def run(self, admin: tuple[str, int], stop: asyncio.Event) -> int:
        server = await start_admin(admin[0], admin[1], self.admin)
        keepers = [asyncio.ensure_future(self._keep(i, stop)) for i in range(self.count)]
        await stop.wait()
        server.close()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.drain + 5):
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
        except TimeoutError:
            for proc in self.procs.values():
                if proc.returncode is None:
                    proc.kill()
        for task in keepers:
            task.cancel()
        return 0
