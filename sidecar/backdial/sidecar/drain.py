"""Drain for Kubernetes: the pod-termination sequence of one sidecar worker.

The injected app container's ``preStop`` calls ``/v1/drain`` on the sidecar's
admin port and waits for the answer (the app must outlive the drain: its
sessions carry the remaining requests).  The sequence, after Knative's
queue-proxy:

1. **quiet period** (``--drain-quiet-period``): ``/readyz`` fails and every
   response carries ``Connection: close``, but new connections are still
   accepted and served, while endpoints, kube-proxy and load balancers catch up
   with the pod's termination;
2. **stop accepting**: the worker stops accepting, takes what the kernel already
   queued, and shuts the shared listening socket down, so a late client is
   refused at once (and retries elsewhere) instead of waiting in a backlog that
   nobody will accept from;
3. **finish**: in-flight and queued requests complete within
   ``--drain-timeout`` (what is left then is aborted);
4. the hook returns; the kubelet then stops the app (its sessions retire
   idle), and only after it the sidecar and the acceptor.

SIGTERM during the quiet period skips the rest of it.  A plain SIGTERM without
a drain keeps the restart behaviour (stop accepting here only; the listening
socket stays open for a replacement sidecar).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from backdial.adminhttp import AdminRequest
from backdial.sidecar.listener import ListenerState

log = logging.getLogger("backdial.sidecar")

DRAIN_TOKEN_HEADER = "x-backdial-drain-token"


def drain_allowed(req: AdminRequest, token: str, tcp: bool) -> bool:
    """Over TCP only the holder of the pod's drain token may drain it (constant time)."""
    if not tcp:
        return True
    given = req.headers.get(DRAIN_TOKEN_HEADER, "")
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


class Phase(enum.Enum):
    SERVING = "serving"
    QUIET = "quiet"  # not ready, still accepting
    FINISHING = "finishing"  # not accepting, finishing in-flight and queued requests
    DRAINED = "drained"


@dataclass(frozen=True, slots=True)
class DrainResult:
    aborted: int  # connections cut at the deadline
    seconds: float

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"drained": True, "aborted": self.aborted, "seconds": round(self.seconds, 3)}


class Drainer:
    """Runs the sequence once; every caller of :meth:`run` waits for the same outcome."""

    def __init__(
        self,
        server: asyncio.AbstractServer,
        listener: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        state: ListenerState,
        stop: asyncio.Event,
        quiet: float,
        timeout: float,
    ) -> None:
        self.server = server
        # A descriptor of our own: closing the server may close the one it was given.
        self.listener = listener.dup()
        self.factory = factory
        self.state = state
        self.stop = stop
        self.quiet = quiet
        self.timeout = timeout
        self.phase = Phase.SERVING
        self._task: asyncio.Task[DrainResult] | None = None

    def discard(self) -> None:
        """Not draining after all (a plain SIGTERM): drop our descriptor, keep the socket."""
        if self._task is None:
            self.listener.close()

    @property
    def started(self) -> bool:
        return self._task is not None

    async def run(self) -> DrainResult:
        if self._task is None:
            self._task = asyncio.ensure_future(self._sequence())
        return await asyncio.shield(self._task)

    async def _sequence(self) -> DrainResult:
        t0 = time.monotonic()
        self.phase = Phase.QUIET
        self.state.draining = True  # responses now say Connection: close
        log.info("drain: not ready; quiet period %.1fs while endpoints update", self.quiet)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.quiet)
        self.phase = Phase.FINISHING
        accepted = await self._stop_accepting()
        log.info(
            "drain: stopped accepting (%d taken from the backlog); finishing %d connections",
            accepted,
            len(self.state.connections),
        )
        aborted = await self.state.shutdown(self.timeout)
        self.phase = Phase.DRAINED
        result = DrainResult(aborted, time.monotonic() - t0)
        log.info("drain: done in %.2fs, %d connections aborted", result.seconds, aborted)
        return result

    async def _stop_accepting(self) -> int:
        """Close the server, accept what the kernel queued, then shut the listener down."""
        self.server.close()
        loop = asyncio.get_running_loop()
        sock = self.listener
        sock.setblocking(False)
        taken: list[socket.socket] = []
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # empty (EAGAIN), or another worker shut it down (EINVAL)
                break
            taken.append(conn)
        # Shutting down a listening socket stops it for every holder (acceptor, other
        # workers): new connections are refused from here on.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        for conn in taken:
            conn.setblocking(False)
            await loop.connect_accepted_socket(self.factory, conn)
        return len(taken)
