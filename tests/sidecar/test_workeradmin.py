"""A worker's readiness: never Ready before its listening socket serves.

``serve_worker`` starts the admin API first, then asks the acceptor for the shared
listening socket and only then creates the server (and attaches the drainer). A worker
that said Ready in between would let Kubernetes route clients to a port that still
refuses connections. The pool's connection state is set by hand here: the point is the
one missing step, not the control protocol (the stack tests cover readiness end to end).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.stats import ProxyStats
from backdial.sidecar.workeradmin import WorkerAdmin


def _never(lease: object) -> object:
    raise AssertionError("no lease is granted in this test")


def test_connected_worker_with_sessions_is_not_ready_before_it_serves(tmp_path: Path) -> None:
    async def check() -> None:
        pool = LeasePool(tmp_path, _never, "w0")
        admin = WorkerAdmin(pool, ProxyStats(), "w0")
        pool.connected.set()  # the acceptor answered and announced registered sessions ...
        pool.disconnected_since = None
        pool.registered = 4
        assert admin.drainer is None  # ... but the listening socket is not served yet
        assert not admin.ready()

    asyncio.run(check())
