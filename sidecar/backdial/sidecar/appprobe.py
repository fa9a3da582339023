"""``/v1/app-probe``: the app's own HTTP probe, through a session but outside the queues.

The injector moves the app's traffic port to the sidecar, so the kubelet can
no longer probe the app directly, and a probe sent to the traffic port would
wait in a slice queue behind client requests (an overloaded pod would then be
declared dead and restarted, the opposite of what helps).  The injected
probes call this endpoint instead, which answers for the *app*:

* no session registered: fail (the app is not up, or cannot reach the acceptor);
* ``tcp=1`` (was a ``tcpSocket`` probe): pass while sessions are registered;
* an idle session in hand: send ``GET <path>`` on it and pass on 2xx/3xx, the
  kubelet's own rule;
* every session this worker holds is busy serving: pass, the app is working
  (a stuck request ends at ``--upstream-timeout`` and breaks its session);
* otherwise lease one session the normal way within the probe's time budget.
"""

from __future__ import annotations

import asyncio
import re

from backdial.control import ReleaseState
from backdial.sidecar.classify import classifier_for
from backdial.sidecar.lease import DiscardingSink, LeasedConn
from backdial.sidecar.leasepool import LeasePool, Refused
from backdial.sidecar.sessionconn import SessionConn

# Visible ASCII only: the values become a request line and a Host field.
_SAFE = re.compile(r"^[\x21-\x7e]{1,2048}$")
USER_AGENT = "backdial-app-probe"


class _Sink(DiscardingSink):
    """ResponseSink of one probe request: keeps the status, gives the session back."""

    def __init__(self, pool: LeasePool, conn: LeasedConn) -> None:
        self.pool, self.conn = pool, conn
        self.status = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def resp_head(
        self, status: int, reason: bytes, lines: list[bytes], length: int, chunked: bool
    ) -> None:
        self.status = status

    def resp_done(self, state: ReleaseState) -> None:
        self.pool.release(self.conn, state)
        if not self.done.done():
            self.done.set_result(self.status)

    def resp_failed(self, started: bool) -> None:
        self.pool.release(self.conn, ReleaseState.BROKEN)
        if not self.done.done():
            self.done.set_result(0)


class AppProber:
    def __init__(self, pool: LeasePool, timeout: float = 0.9) -> None:
        self.pool = pool
        self.timeout = timeout  # under the kubelet's default 1 s probe timeout

    async def check(self, path: str, host: str, tcp: bool) -> tuple[bool, str]:
        """(passed, reason) for one probe."""
        pool = self.pool
        if not _SAFE.match(path) or not path.startswith("/") or (host and not _SAFE.match(host)):
            return False, "bad probe path or host"
        if pool.registered == 0 and not pool.held:
            return False, "no session registered"
        if tcp:
            return True, f"{pool.registered} sessions registered"
        service = classifier_for(pool.policy).service(
            host.lower().rsplit(":", 1)[0].encode(), path.encode()
        )
        slice_name = pool.policy.default_slice
        conn = pool.try_acquire(service, slice_name)
        if conn is None:
            if pool.busy and len(pool.busy) == len(pool.held):
                return True, f"all {len(pool.busy)} held sessions busy serving"
            try:
                conn = await asyncio.wait_for(pool.acquire(service, slice_name), self.timeout)
            except (TimeoutError, Refused):
                return False, "no session free for the probe"
        return await self._send(conn, path, host or "localhost")

    async def _send(self, conn: LeasedConn, path: str, host: str) -> tuple[bool, str]:
        sink = _Sink(self.pool, conn)
        upstream = conn if isinstance(conn, SessionConn) else None
        head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n\r\n"
        if upstream is None or not upstream.start(head.encode("ascii"), sink, False, False):
            self.pool.release(conn, ReleaseState.BROKEN)
            return False, "session gone"
        try:
            status = await asyncio.wait_for(asyncio.shield(sink.done), self.timeout)
        except TimeoutError:
            upstream.abort()
            self.pool.release(conn, ReleaseState.BROKEN)
            return False, f"app did not answer GET {path} in time"
        if 200 <= status < 400:
            return True, f"app answered {status}"
        return False, f"app answered {status or 'nothing'}"
