"""A sidecar worker's admin API: probes, metrics, state, drain and the app probe.

``/healthz`` asks ``liveness.py`` whether the worker is wedged, ``/readyz`` whether
it can serve now; ``/metrics`` renders the proxy's counters and the pool's gauges
when scraped; ``/v1/state`` is the worker's view of its leases and queues;
``/v1/drain`` runs the pod-termination sequence (``drain.py``) and needs the drain
token on TCP; ``/v1/app-probe`` runs the app's own probe over a session
(``appprobe.py``).  With ``--workers N`` the supervisor serves the same paths and
asks each worker over its UNIX admin socket.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from backdial.adminhttp import AdminRequest, AdminResponse
from backdial.metrics import gauge, registry
from backdial.sidecar.appprobe import AppProber
from backdial.sidecar.drain import Drainer, drain_allowed
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.liveness import Liveness
from backdial.sidecar.stats import ProxyStats


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
        for (_, slice_name), n in pool.waiting_counts().items():
            waiting[slice_name] += n
        yield gauge(
            "backdial_sidecar_requests_waiting",
            "Requests waiting in this worker for a session, by slice.",
            [({"slice": name}, float(n)) for name, n in sorted(waiting.items())],
        )

    def ready(self) -> bool:
        # The drainer is attached once the listening socket serves (main.serve_worker), so
        # a worker is never Ready while connects to --listen would still be refused.
        return (
            not self.draining
            and self.drainer is not None
            and not self.drainer.started
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
                        f"{k[0] or '(default)'}/{k[1]}": n for k, n in pool.waiting_counts().items()
                    },
                    # Requests that may not wait, while the acceptor is asked (not waiting).
                    "asking": {
                        f"{k[0] or '(default)'}/{k[1]}": n for k, n in pool.asking_counts().items()
                    },
                },
            )
        return AdminResponse.text(404, "not found\n")
