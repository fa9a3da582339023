"""The acceptor's IO shell: registration listeners, session watching, control socket.

All decisions are delegated to :class:`~backdial.acceptor.ledger.Ledger`; this
module moves bytes and descriptors.  The acceptor keeps its own descriptor of
every session, also while a worker leases it, so it can reclaim the session
(shut it down) if that worker vanishes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from backdial import control, fdpass, wire
from backdial.acceptor.ledger import DropReason, GrantAction, Ledger, Session
from backdial.control import ErrorCode, ReleaseState
from backdial.policy import Policy

log = logging.getLogger("backdial.acceptor")


@dataclass(slots=True)
class Worker:
    id: int
    channel: fdpass.Channel
    pid: int = 0
    name: str = ""
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Counters:
    registrations_ok: int = 0
    registrations_err: collections.Counter[wire.ErrCode] = field(
        default_factory=collections.Counter
    )
    sessions_dropped: collections.Counter[DropReason] = field(default_factory=collections.Counter)
    grants: int = 0
    recalls: int = 0
    reloads: collections.Counter[str] = field(default_factory=collections.Counter)
    records: collections.Counter[control.Kind] = field(default_factory=collections.Counter)
    retired_workers: collections.Counter[str] = field(default_factory=collections.Counter)


class Acceptor:
    """Owns every session; grants leases to sidecar workers."""

    def __init__(self, run_dir: Path, policy: Policy, register_tcp: tuple[str, int] | None = None):
        self.run_dir = run_dir
        self.ledger = Ledger(policy)
        self.register_tcp = register_tcp
        self.workers: dict[int, Worker] = {}
        self.counters = Counters()
        self.listeners: dict[str, socket.socket] = {}  # client listening sockets handed to sidecars
        self.generation = 1
        self.started = time.time()
        self.draining = False
        self.closing = False
        self._next_worker = 1
        self._pump_scheduled = False
        self._announced = -1  # registered-session count last sent to workers
        self._servers: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def policy(self) -> Policy:
        return self.ledger.policy

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        reg = _unix_listener(self.run_dir / "register.sock", socket.SOCK_STREAM)
        self._listen(reg, self._accept_registration)
        if self.register_tcp:
            tcp = socket.create_server(self.register_tcp, backlog=1024, reuse_port=False)
            self._listen(tcp, self._accept_registration)
        ctl = _unix_listener(self.run_dir / "control.sock", socket.SOCK_SEQPACKET)
        self._listen(ctl, self._accept_worker)

    def _listen(self, sock: socket.socket, on_ready: object) -> None:
        sock.setblocking(False)
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), on_ready, sock)  # type: ignore[arg-type]
        self._servers.append(sock)

    def close(self) -> None:
        """Stop: idle sessions are shut down (their services redial the next acceptor);
        leased ones are only let go, so requests running on them still finish."""
        assert self._loop is not None
        self.closing = True
        for sock in self._servers:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._servers.clear()
        for worker in list(self.workers.values()):
            worker.channel.close()
        for sess in list(self.ledger.sessions.values()):
            self._close_session(sess, DropReason.SHUTDOWN)
        for sock in self.listeners.values():
            sock.close()
        for task in self._tasks:
            task.cancel()

    # -- registration ---------------------------------------------------------------
    def _accept_registration(self, server: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _ = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log and let the backlog wait
                log.warning("accept on register socket failed: %s", exc)
                return
            conn.setblocking(False)
            task = asyncio.ensure_future(self._register(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _register(self, conn: socket.socket) -> None:
        assert self._loop is not None
        limits = self.policy.limits
        buf = bytearray()
        try:
            async with asyncio.timeout(limits.preamble_timeout):
                while (end := wire.find_line(buf)) < 0:
                    chunk = await self._loop.sock_recv(conn, wire.MAX_PREAMBLE)
                    if not chunk:
                        raise wire.PreambleError(wire.ErrCode.MALFORMED, "closed before preamble")
                    buf += chunk
            if end != len(buf):
                raise wire.PreambleError(wire.ErrCode.MALFORMED, "bytes after preamble before OK")
            pre = wire.parse_preamble(bytes(buf))
            self._admit(pre)
        except TimeoutError:
            self._refuse(conn, wire.ErrCode.TIMEOUT, "no preamble within the deadline")
            return
        except wire.PreambleError as exc:
            self._refuse(conn, exc.code, exc.message)
            return
        except OSError:
            conn.close()
            return
        reg = self.ledger.find_registrant(pre.service, pre.instance)
        if reg is None:
            reg = self.ledger.add_registrant(pre.service, pre.instance, pre.slice)
            log.info("registrant %d: service=%s instance=%s", reg.id, pre.service, pre.instance)
        elif len(reg.sessions) >= limits.max_sessions_per_registrant:
            self._refuse(conn, wire.ErrCode.LIMIT, "registrant session limit reached")
            return
        sess = self.ledger.add_session(reg, conn.detach())
        try:
            os.write(sess.fd, wire.encode_ok(sess.id, reg.id))
        except OSError:
            self._drop(sess, DropReason.DEAD)
            return
        self.counters.registrations_ok += 1
        self._watch(sess)
        self.schedule_pump()

    def _admit(self, pre: wire.Preamble) -> None:
        policy = self.policy
        if self.draining:
            raise wire.PreambleError(wire.ErrCode.DRAINING, "acceptor is shutting down")
        if policy.tokens and pre.token not in policy.tokens:
            raise wire.PreambleError(wire.ErrCode.AUTH, "token missing or not accepted")
        if len(self.ledger.sessions) >= policy.limits.max_sessions:
            raise wire.PreambleError(wire.ErrCode.LIMIT, "acceptor session limit reached")

    def _refuse(self, conn: socket.socket, code: wire.ErrCode, message: str) -> None:
        self.counters.registrations_err[code] += 1
        log.info("registration refused: %s: %s", code.value, message)
        with contextlib.suppress(OSError):
            conn.send(wire.encode_err(code, message))
        conn.close()

    # -- idle session watching --------------------------------------------------------
    def _watch(self, sess: Session) -> None:
        assert self._loop is not None
        self._loop.add_reader(sess.fd, self._idle_readable, sess.id)

    def _idle_readable(self, sid: int) -> None:
        """An idle session became readable: the service closed it, retired it or misbehaved."""
        sess = self.ledger.sessions.get(sid)
        if sess is None or sess.worker:
            return
        try:
            data = os.read(sess.fd, 256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sess, DropReason.DEAD)
        elif data == wire.RETIRE_LINE:
            self._drop(sess, DropReason.RETIRED)
        else:
            log.warning("session %d: unexpected %d bytes while idle; dropping", sid, len(data))
            self._drop(sess, DropReason.PROTOCOL)

    def _drop(self, sess: Session, reason: DropReason) -> None:
        self.ledger.drop_session(sess.id)
        self._close_session(sess, reason)
        self.schedule_pump()

    def _close_session(self, sess: Session, reason: DropReason) -> None:
        assert self._loop is not None
        if not sess.worker:
            self._loop.remove_reader(sess.fd)
        if reason in (DropReason.BROKEN, DropReason.RECLAIMED, DropReason.SHUTDOWN):
            _shutdown(sess.fd)
        os.close(sess.fd)
        self.counters.sessions_dropped[reason] += 1

    # -- control socket ---------------------------------------------------------------
    def _accept_worker(self, server: socket.socket) -> None:
        for _ in range(16):
            try:
                conn, _ = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on control socket failed: %s", exc)
                return
            wid = self._next_worker
            self._next_worker += 1
            channel = fdpass.Channel(
                conn,
                functools.partial(self._on_record, wid),
                functools.partial(self._on_worker_gone, wid),
            )
            self.workers[wid] = Worker(wid, channel)

    def _on_record(self, wid: int, msg: control.Message, fds: list[int]) -> None:
        handed_back = isinstance(msg, control.Listen) and len(fds) == 1
        if handed_back:
            assert isinstance(msg, control.Listen)
            self._adopt_listener(msg.address, fds.pop())
        for fd in fds:  # otherwise workers send no descriptors to the acceptor
            os.close(fd)
        worker = self.workers.get(wid)
        if worker is None:
            return
        self.counters.records[control.kind_of(msg)] += 1
        if isinstance(msg, control.Hello):
            worker.pid, worker.name = msg.pid, msg.name
            self.ledger.add_worker(wid)
            log.info("worker %d connected (pid %d %s)", wid, msg.pid, msg.name)
            self.broadcast_config()
            worker.channel.send(control.Stats({"registered": float(len(self.ledger.sessions))}))
        elif isinstance(msg, control.Want):
            self.ledger.set_want(wid, (msg.service, msg.slice), msg.n)
            self.schedule_pump()
        elif isinstance(msg, control.Release):
            for item in msg.sessions:
                self._on_release(wid, item)
            self.schedule_pump()
        elif isinstance(msg, control.Listen):
            if handed_back:
                return
            if msg.address in self.listeners:
                worker.channel.send(
                    control.Listener(msg.address), [self.listeners[msg.address].fileno()]
                )
            else:
                self._on_listen(worker, msg.address)
        elif isinstance(msg, control.Stats):
            worker.stats = msg.counters
        else:
            worker.channel.close(control.ProtocolError(f"unexpected {type(msg).__name__}"))

    def _on_release(self, wid: int, item: control.Released) -> None:
        sess = self.ledger.sessions.get(item.session)
        if sess is None or sess.worker != wid:
            return  # already gone (e.g. the service closed it meanwhile)
        if item.state == ReleaseState.IDLE and self.ledger.give_back(sess.id, wid):
            self._watch(sess)
        else:
            # Leased sessions are not watched by the acceptor, so only the fd goes.
            self.ledger.drop_session(sess.id)
            retired = item.state == ReleaseState.RETIRED
            self._close_session_leased(sess, DropReason.RETIRED if retired else DropReason.BROKEN)

    def _close_session_leased(self, sess: Session, reason: DropReason) -> None:
        if reason == DropReason.BROKEN or (reason == DropReason.RECLAIMED and not self.closing):
            # A vanished worker's sessions are in an unknown state: make their services
            # see end-of-file even if a stuck worker process still holds a copy.  When
            # the acceptor itself stops, workers are alive and finish what they run.
            _shutdown(sess.fd)
        os.close(sess.fd)
        self.counters.sessions_dropped[reason] += 1

    def _adopt_listener(self, address: str, fd: int) -> None:
        """A worker that outlived the previous acceptor hands back the listening socket,
        so the next sidecar can take it over instead of failing to bind the port."""
        sock = socket.socket(fileno=fd)
        if address in self.listeners or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.close()
            return
        self.listeners[address] = sock
        log.info("adopted client listener %s from a sidecar worker", address)

    def _on_listen(self, worker: Worker, address: str) -> None:
        sock = self.listeners.get(address)
        if sock is None:
            try:
                host, _, port = address.rpartition(":")
                sock = socket.create_server((host.strip("[]"), int(port)), backlog=4096)
            except (OSError, ValueError) as exc:
                worker.channel.send(
                    control.Error(ErrorCode.LISTEN, f"cannot listen on {address}: {exc}")
                )
                return
            self.listeners[address] = sock
            log.info("holding client listener %s for sidecars", address)
        worker.channel.send(control.Listener(address), [sock.fileno()])

    def _on_worker_gone(self, wid: int, exc: Exception | None) -> None:
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        for key, value in worker.stats.items():  # keep counters monotonic across workers
            self.counters.retired_workers[key] += int(value)
        held = self.ledger.remove_worker(wid)
        for sess in held:
            self._close_session_leased(sess, DropReason.RECLAIMED)
        if held or exc:
            log.warning(
                "worker %d gone (%s); reclaimed %d leased sessions", wid, exc or "closed", len(held)
            )
        self.broadcast_config()
        self.schedule_pump()

    def broadcast_config(self) -> None:
        ids = sorted(w for w in self.workers if w in self.ledger.wants)
        wire_policy = self.policy.to_wire()
        for index, wid in enumerate(ids):
            self.workers[wid].channel.send(
                control.ConfigMsg(self.generation, wire_policy, wid, len(ids), index)
            )

    def set_policy(self, policy: Policy) -> None:
        self.ledger.set_policy(policy)
        self.generation += 1
        self.broadcast_config()
        self.schedule_pump()

    # -- granting -----------------------------------------------------------------------
    def schedule_pump(self) -> None:
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        assert self._loop is not None
        self._pump_scheduled = False
        grants = self.ledger.pump(self.policy.limits.lease_prefetch)
        by_worker: dict[int, list[GrantAction]] = collections.defaultdict(list)
        for g in grants:
            self._loop.remove_reader(g.session.fd)
            by_worker[g.worker].append(g)
        for wid, actions in by_worker.items():
            channel = self.workers[wid].channel
            for start in range(0, len(actions), control.MAX_FDS):
                batch = actions[start : start + control.MAX_FDS]
                leases = [
                    control.Granted(
                        g.session.id,
                        g.session.service,
                        g.session.slice,
                        g.session.registrant,
                        g.requested,
                        g.prefetch,
                    )
                    for g in batch
                ]
                channel.send(control.Grant(leases), [g.session.fd for g in batch])
            self.counters.grants += len(actions)
        for wid, service, n in self.ledger.recall_plan():
            self.workers[wid].channel.send(control.Recall(service, n))
            self.counters.recalls += n
        registered = len(self.ledger.sessions)
        if registered != self._announced:
            self.announce(registered)

    def announce(self, registered: int) -> None:
        """Tell workers how many sessions are registered (their /readyz depends on it)."""
        self._announced = registered
        for worker in self.workers.values():
            worker.channel.send(control.Stats({"registered": float(registered)}))


def _shutdown(fd: int) -> None:
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _unix_listener(path: Path, kind: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(1024)
    return sock
