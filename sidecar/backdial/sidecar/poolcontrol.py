"""The worker's control connection to the acceptor, and what arrives on it.

``start`` runs ``_run``: connect to ``control.sock``, HELLO (with this
worker's control revision), hand a new acceptor the listening sockets it
gave us, and wait until the connection drops; then every lease is orphaned
(the acceptor reclaimed them: idle ones close now, busy ones after their
request) and it reconnects with jittered exponential backoff, forever, also
after EMFILE.  A task that fails is logged and started again.

``_on_record`` handles what the acceptor sends: GRANT (each session adopted
through the pool's ``ConnFactory`` and settled to a waiter or kept idle),
CONFIG (policy, this worker's index, the acceptor's revision), STATS, RECALL,
REFUSE, LISTENER and ERROR.  Sessions idle longer than ``leaseIdleRelease``
go back from the idle sweeper.

Part of ``leasepool.LeasePool``; the shared state is ``poolbase.PoolBase``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable

from backdial import control, fdpass
from backdial.control import ErrorCode, ReleaseState
from backdial.policy import PolicyError, policy_from_data
from backdial.sidecar.lease import Lease, LeasedConn
from backdial.sidecar.poolbase import PoolBase

log = logging.getLogger("backdial.sidecar")


def _resolve(fut: asyncio.Future[Exception | None], exc: Exception | None) -> None:
    if not fut.done():
        fut.set_result(exc)


class ControlClient(PoolBase):
    """The control-connection part of ``leasepool.LeasePool``."""

    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())
        self._runner.add_done_callback(self._runner_done)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """The connection task must outlive every error: log it and start over."""
        if task.cancelled() or self.closing:
            return
        self.control_failures += 1
        log.error("control connection task failed: %r; restarting it", task.exception())
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._orphan_leases()
        self.connected.clear()
        if self.disconnected_since is None:
            self.disconnected_since = time.monotonic()
        self._loop.call_later(1.0, self.start)

    async def _run(self) -> None:
        delay = 0.05
        while not self.closing:
            try:
                sock = await self._connect()
            except OSError as exc:  # EMFILE included: a worker never stops trying
                self.control_failures += 1
                if delay >= 0.8:
                    self._outage.report(
                        f"down:{exc}",
                        logging.WARNING,
                        "acceptor control socket %s: %s; retrying",
                        self.control_path,
                        exc,
                    )
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)
                continue
            self.control_connects += 1
            self.disconnected_since = None
            connected_at = time.monotonic()
            closed: asyncio.Future[Exception | None] = self._loop.create_future()
            self._epoch += 1
            self._reported.clear()
            self._channel = fdpass.Channel(
                sock,
                self._on_record,
                functools.partial(_resolve, closed),
            )
            self._channel.send(control.Hello(os.getpid(), self.name, control.REVISION))
            for address, listener in self._listeners.items():
                # A new acceptor does not hold our listening socket yet: hand it a copy.
                self._channel.send(control.Listen(address), [listener.fileno()])
            self.connected.set()
            self._mark_want()
            idle_task = asyncio.ensure_future(self._idle_sweeper())
            try:
                reason = await closed
            finally:
                idle_task.cancel()
            self.connected.clear()
            self.disconnected_since = now = time.monotonic()
            self._channel = None
            self._orphan_leases()
            if self.closing:
                return
            why = str(reason or "closed by the acceptor")
            self._outage.report(  # each distinct cause once per interval (EMFILE stands out)
                "down:" + why,
                logging.WARNING,
                "lost the acceptor control connection (%s); reconnecting",
                why,
            )
            if now - connected_at < 1.0:
                # Lost at once (e.g. EMFILE passing our listener on): back off, never spin.
                self.control_failures += 1
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)
            else:
                delay = 0.05

    async def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            await self._loop.sock_connect(sock, str(self.control_path))
        except BaseException:
            sock.close()
            raise
        return sock

    def _orphan_leases(self) -> None:
        """The acceptor reclaimed our leases: close idle ones now, busy ones after their request.
        Asks it had not answered never will be: nothing can be had now."""
        for conn in self._forget_leases():
            conn.close()
        self._answers = 0
        self._forget_asks()
        for listener in self._listen_waiters.values():
            if not listener.done():
                listener.set_exception(ConnectionError("acceptor connection lost"))
        self._listen_waiters.clear()

    def _on_record(self, msg: control.Message, fds: list[int]) -> None:
        if isinstance(msg, control.Grant):
            if len(fds) != len(msg.leases):
                for fd in fds:
                    os.close(fd)
                log.error("GRANT with %d leases but %d descriptors", len(msg.leases), len(fds))
                return
            for entry, fd in zip(msg.leases, fds, strict=True):
                key = (entry.requested, entry.slice)
                # On its way (an ``asked`` one to an asking ticket): it covers one.
                grant = self._granted(key, entry.asked)
                if not entry.prefetch and not entry.asked:
                    # The acceptor took one unit off our WANT for this key: mirror it, so
                    # the next change of our count is measured against what it now knows.
                    left = self._reported.get(key, 0) - 1
                    if left > 0:
                        self._reported[key] = left
                    else:
                        self._reported.pop(key, None)
                    self._mark_want()
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                lease = Lease(
                    entry.session,
                    entry.service,
                    entry.slice,
                    entry.registrant,
                    sock,
                    key,
                    epoch=self._epoch,
                    asked=entry.asked,
                )
                self._spawn(self._adopt(lease, grant))
        elif isinstance(msg, control.ConfigMsg):
            self._apply_config(msg)
        elif isinstance(msg, control.Stats):
            self.registered = int(msg.counters.get("registered", self.registered))
        elif isinstance(msg, control.Recall):
            if msg.now:  # a probe for another worker's ask
                self.book.probe(msg.service, msg.slice, msg.n)
                self._answer_probes()
            else:
                for conn in self._recall_idle(msg.service, msg.slice, msg.n):
                    self._give_back(conn, ReleaseState.IDLE)
        elif isinstance(msg, control.Refuse):
            self._ask_refused((msg.service, msg.slice), msg.n)
        elif isinstance(msg, control.Listener):
            self._resolve_listener(msg.address, fds)
        elif isinstance(msg, control.Error):
            log.error("acceptor error %s: %s", msg.code, msg.message)
            for fd in fds:
                os.close(fd)
            if msg.code == ErrorCode.LISTEN:
                for fut in self._listen_waiters.values():
                    if not fut.done():
                        fut.set_exception(OSError(msg.message))
        else:
            for fd in fds:
                os.close(fd)

    async def _adopt(self, lease: Lease, grant: int) -> None:
        try:
            await self._take_in(lease)
        finally:
            # Arrived (or unusable): it no longer covers an asking ticket (any left
            # without cover is refused), and probes granted after it may be answered.
            if lease.epoch == self._epoch:
                self._adopted(grant)
                self._answer_probes()
                self._mark_want()  # no longer on its way: what we report may change

    async def _take_in(self, lease: Lease) -> None:
        try:
            conn = await self.conn_factory(lease)
        except OSError as exc:
            log.warning("session %d unusable: %s", lease.session, exc)
            lease.sock.close()
            if lease.epoch == self._epoch and self._channel is not None:
                self._channel.send(
                    control.Release([control.Released(lease.session, ReleaseState.BROKEN)])
                )
            return
        self.held[lease.session] = conn
        if lease.epoch != self._epoch:
            self.held.pop(lease.session, None)
            conn.close()
            return
        self._settle(conn)

    def _apply_config(self, msg: control.ConfigMsg) -> None:
        try:
            self.policy = policy_from_data(msg.config, "acceptor config")
        except PolicyError as exc:  # the acceptor validated it; a mismatch is a version skew
            log.error("ignoring config generation %d: %s", msg.generation, exc)
            return
        if (self._outage.state or "").startswith("down"):  # a CONFIG proves the link works
            self._outage.report("up", logging.INFO, "acceptor control connection is back")
        self.generation, self.worker_id = msg.generation, msg.worker
        self.workers, self.index = msg.workers, msg.index
        self.acceptor_revision = msg.revision
        self._split_queues()
        valid = {s.name for s in self.policy.slices}
        # Waiters of a removed slice keep waiting until their own timeout; leases for it
        # go back when idle so the acceptor re-counts them under the new slices.
        for key, ring in list(self.idle.items()):
            if key[1] not in valid:
                for conn in ring.drain():
                    self._return_idle(conn)
        self.configured.set()

    def _forget_leases(self) -> list[LeasedConn]:
        return self.book.orphans()

    def _recall_idle(self, service: str, slice_name: str, n: int) -> list[LeasedConn]:
        return self.book.recall_idle(service, slice_name, n)

    def _idle_since_before(self, cutoff: float) -> list[LeasedConn]:
        return self.book.idle_since_before(cutoff)

    async def _idle_sweeper(self) -> None:
        while True:
            limit = self.policy.limits.lease_idle_release
            await asyncio.sleep(max(0.05, min(limit / 2, 1.0)))
            for conn in self._idle_since_before(time.monotonic() - limit):
                self._return_idle(conn)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- listening socket ----------------------------------------------------------------
    async def listener(self, address: str, wait: float = 10.0) -> socket.socket:
        """The client listening socket the acceptor holds for *address*."""
        async with asyncio.timeout(wait):
            await self.connected.wait()
            fut = self._listen_waiters.get(address)
            if fut is None or fut.done():
                fut = self._loop.create_future()
                self._listen_waiters[address] = fut
                assert self._channel is not None
                self._channel.send(control.Listen(address))
            return await fut

    def _resolve_listener(self, address: str, fds: list[int]) -> None:
        fut = self._listen_waiters.pop(address, None)
        if fut is None or fut.done() or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        sock = socket.socket(fileno=fds[0])
        self._listeners[address] = sock
        fut.set_result(sock)
