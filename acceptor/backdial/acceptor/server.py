"""The acceptor's IO shell: registration listeners, session watching, control socket.

All decisions are delegated to :class:`~backdial.acceptor.ledger.Ledger`; this
module moves bytes and descriptors.  The acceptor keeps its own descriptor of
every session, also while a worker leases it, so it can reclaim the session
(shut it down) if that worker vanishes.

Peers are not trusted blindly: UNIX sockets admit only allowed uids
(``SO_PEERCRED``), and every control peer is bounded (connections, time to
HELLO, WANT counts and keys, listeners, unread records) so that a faulty or
hostile worker can be disconnected, never wedge or bloat the acceptor.
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
from typing import Any

from backdial import control, fdpass, wire
from backdial.acceptor import asking, capacity, lending
from backdial.acceptor.ledger import DropReason, GrantAction, Ledger, RecallAction, Session
from backdial.control import ErrorCode, ReleaseState
from backdial.policy import Policy
from backdial.sdk.backoff import StateLog
from backdial.trust import Uids, admitted, bind_unix

log = logging.getLogger("backdial.acceptor")

# Per-peer bounds on the control socket (docs/security.md).
MAX_WORKERS = 256  # control connections at once (64 workers x restarts overlapping)
MAX_WANT_KEYS = 256  # distinct (service, slice) keys one worker may wait for
MAX_LISTENERS = 16  # client listening sockets the acceptor binds for workers
SWEEP_INTERVAL = 1.0  # seconds between housekeeping sweeps


@dataclass(slots=True)
class Worker:
    id: int
    channel: fdpass.Channel
    connected: float = 0.0  # monotonic time of connect
    helloed: bool = False
    serving: bool = False  # holds a client listener (counted in the queue split)
    pid: int = 0
    name: str = ""
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SocketTrust:
    """Allowed peer uids of the UNIX sockets (``register.sock``; ``control.sock`` and
    ``admin.sock``, which carry the same authority)."""

    register: Uids = field(default_factory=Uids.own)
    control: Uids = field(default_factory=Uids.own)


@dataclass(slots=True)
class Counters:
    registrations_ok: int = 0
    registrations_err: collections.Counter[wire.ErrCode] = field(
        default_factory=collections.Counter
    )
    sessions_dropped: collections.Counter[DropReason] = field(default_factory=collections.Counter)
    grants: int = 0
    recalls: int = 0
    asks: collections.Counter[str] = field(default_factory=collections.Counter)  # granted/refused
    probes: int = 0  # sessions asked back at once for asks (RECALL now)
    reloads: collections.Counter[str] = field(default_factory=collections.Counter)
    records: collections.Counter[control.Kind] = field(default_factory=collections.Counter)
    retired_workers: collections.Counter[str] = field(default_factory=collections.Counter)
    peers_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: collections.Counter[str] = field(default_factory=collections.Counter)
    services_forgotten: int = 0
    admin_denied: collections.Counter[int] = field(default_factory=collections.Counter)


class Acceptor:
    """Owns every session; grants leases to sidecar workers."""

    def __init__(
        self,
        run_dir: Path,
        policy: Policy,
        register_tcp: tuple[str, int] | None = None,
        trust: SocketTrust | None = None,
    ):
        self.run_dir = run_dir
        self.ledger = Ledger(policy)
        self.register_tcp = register_tcp
        self.trust = trust or SocketTrust()
        self.workers: dict[int, Worker] = {}
        self.counters = Counters()
        self.listeners: dict[str, socket.socket] = {}  # client listening sockets handed to sidecars
        self.generation = 1
        self.operator: dict[str, Any] | None = None  # the operator link's state, if any
        self.started = time.time()
        self.draining = False
        self.closing = False
        self._next_worker = 1
        self._pump_scheduled = False
        self._config_scheduled = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._refusals = StateLog(log, interval=10.0)
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
        reg = bind_unix(self.run_dir / "register.sock", self.trust.register.mode())
        self._listen(reg, self._accept_registration)
        if self.register_tcp:
            tcp = socket.create_server(self.register_tcp, backlog=1024, reuse_port=False)
            self._listen(tcp, self._accept_registration)
        ctl = bind_unix(
            self.run_dir / "control.sock", self.trust.control.mode(), socket.SOCK_SEQPACKET
        )
        self._listen(ctl, self._accept_worker)
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

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
        if self._sweeper is not None:
            self._sweeper.cancel()
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
            if conn.family == socket.AF_UNIX and not self._admit_peer(
                conn, self.trust.register, "register"
            ):
                with contextlib.suppress(OSError):
                    conn.send(wire.encode_err(wire.ErrCode.AUTH, "peer uid not allowed"))
                conn.close()
                continue
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
        services = self.ledger.services
        if pre.service not in services and len(services) >= policy.limits.max_services:
            if self.ledger.evict_empty_service() is None:
                raise wire.PreambleError(wire.ErrCode.LIMIT, "acceptor service limit reached")
            self.counters.services_forgotten += 1

    def _admit_peer(self, conn: socket.socket, allowed: Uids, what: str) -> bool:
        ok, uid = admitted(conn, allowed)
        if not ok:
            self.counters.peers_refused[what] += 1
            self._refusals.report(
                what, logging.WARNING, "%s.sock: refused peer uid %d (allowed: %s)", what, uid,
                allowed,
            )  # fmt: skip
        return ok

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
            if not self._admit_peer(conn, self.trust.control, "control"):
                conn.close()
                continue
            if len(self.workers) >= MAX_WORKERS:
                self._violation(0, "workers", f"more than {MAX_WORKERS} control connections")
                conn.close()
                continue
            wid = self._next_worker
            self._next_worker += 1
            channel = fdpass.Channel(
                conn,
                functools.partial(self._on_record, wid),
                functools.partial(self._on_worker_gone, wid),
            )
            assert self._loop is not None
            self.workers[wid] = Worker(wid, channel, self._loop.time())

    def _violation(self, wid: int, kind: str, detail: str) -> None:
        """A control peer broke a bound: count it and disconnect it (0: not yet connected)."""
        self.counters.violations[kind] += 1
        self._refusals.report(
            "violation:" + kind, logging.WARNING, "control peer %d: %s", wid, detail
        )
        worker = self.workers.get(wid)
        if worker is not None:
            worker.channel.close(control.ProtocolError(detail))

    def _on_record(self, wid: int, msg: control.Message, fds: list[int]) -> None:
        handed_back = isinstance(msg, control.Listen) and len(fds) == 1
        worker = self.workers.get(wid)
        if handed_back and worker is not None and worker.helloed:
            assert isinstance(msg, control.Listen)
            if self._adopt_listener(msg.address, fds.pop()):
                self._set_serving(worker)
        for fd in fds:  # otherwise workers send no descriptors to the acceptor
            os.close(fd)
        if worker is None:
            return
        self.counters.records[control.kind_of(msg)] += 1
        if isinstance(msg, control.Hello):
            if worker.helloed:
                self._violation(wid, "hello", "second HELLO")
                return
            worker.helloed = True
            worker.pid, worker.name = msg.pid, msg.name
            # What the worker's revision understands (docs/protocol.md 2.5): a RECALL's
            # slice from 2, RECALL now (probes for asks) from 3.
            self.ledger.add_worker(wid, msg.revision)
            log.info("worker %d connected (pid %d %s)", wid, msg.pid, msg.name)
            self.schedule_config()
            worker.channel.send(control.Stats({"registered": float(len(self.ledger.sessions))}))
        elif not worker.helloed:
            self._violation(wid, "hello", f"{type(msg).__name__} before HELLO")
        elif isinstance(msg, control.Want):
            self._on_want(worker, msg)
        elif isinstance(msg, control.Release):
            for item in msg.sessions:
                self._on_release(wid, item)
            if msg.answers:  # its answers to probes: the idle sessions came with them
                returned = sum(1 for item in msg.sessions if item.state is ReleaseState.IDLE)
                self.ledger.probes_answered(wid, msg.answers, returned)
            self.enforce_cap()
            self.schedule_pump()
        elif isinstance(msg, control.Ask):
            self._on_ask(worker, msg)
        elif isinstance(msg, control.Listen):
            if handed_back:
                return
            if msg.address in self.listeners:
                worker.channel.send(
                    control.Listener(msg.address), [self.listeners[msg.address].fileno()]
                )
                self._set_serving(worker)
            else:
                self._on_listen(worker, msg.address)
        elif isinstance(msg, control.Stats):
            worker.stats = msg.counters
        else:
            self._violation(wid, "unexpected", f"unexpected {type(msg).__name__}")

    def _on_want(self, worker: Worker, msg: control.Want) -> None:
        # No worker may queue more for a key than the slice's whole queue holds: this
        # bounds the units the ledger keeps whatever a peer claims.
        spec = next((s for s in self.policy.slices if s.name == msg.slice), None)
        if spec is None:
            spec = next(s for s in self.policy.slices if s.name == self.policy.default_slice)
        n = min(msg.n, spec.queue.max_waiting)
        if n < msg.n:
            self.counters.violations["want_clamped"] += 1
        key = (msg.service, msg.slice)
        wants = self.ledger.wants.get(worker.id)
        if n and wants is not None and key not in wants and len(wants) >= MAX_WANT_KEYS:
            self._violation(worker.id, "want_keys", f"waits for more than {MAX_WANT_KEYS} keys")
            return
        self.ledger.set_want(worker.id, key, n)
        self.schedule_pump()

    def _on_ask(self, worker: Worker, msg: control.Ask) -> None:
        if not self.ledger.probes_answer(worker.id):
            # Its answers (GRANT asked, REFUSE) would be records it does not know.
            self._violation(worker.id, "ask", "ASK from a worker below revision 3")
            return
        if self.ledger.asks_of(worker.id) >= MAX_WANT_KEYS:
            self._violation(worker.id, "asks", f"more than {MAX_WANT_KEYS} asks unanswered")
            return
        self.ledger.add_ask(worker.id, (msg.service, msg.slice), msg.n)
        self.schedule_pump()

    def _set_serving(self, worker: Worker) -> None:
        if not worker.serving:
            worker.serving = True
            self.schedule_config()

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

    def _adopt_listener(self, address: str, fd: int) -> bool:
        """A worker that outlived the previous acceptor hands back the listening socket,
        so the next sidecar can take it over instead of failing to bind the port.

        Only a listening TCP socket is kept; any other descriptor is closed (True when
        the worker serves *address*, whether or not its copy was adopted)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket at all
            os.close(fd)
            self.counters.violations["listen_fd"] += 1
            return False
        try:
            usable = (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            )
        except OSError:
            usable = False
        if not usable:
            sock.close()
            self.counters.violations["listen_fd"] += 1
            return False
        if address in self.listeners or len(self.listeners) >= MAX_LISTENERS:
            sock.close()
            return address in self.listeners
        self.listeners[address] = sock
        log.info("adopted client listener %s from a sidecar worker", address)
        return True

    def _on_listen(self, worker: Worker, address: str) -> None:
        sock = self.listeners.get(address)
        if sock is None:
            if len(self.listeners) >= MAX_LISTENERS:
                worker.channel.send(
                    control.Error("listen", f"more than {MAX_LISTENERS} client listeners")
                )
                return
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
        self._set_serving(worker)

    def _on_worker_gone(self, wid: int, exc: Exception | None) -> None:
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        # Capacity first: whatever else goes wrong, no session stays leased to nobody.
        held = self.ledger.remove_worker(wid)
        for sess in held:
            self._close_session_leased(sess, DropReason.RECLAIMED)
        for key, value in worker.stats.items():  # keep counters monotonic across workers
            self.counters.retired_workers[key] += int(value)
        if isinstance(exc, fdpass.PeerNotReading):
            self.counters.violations["not_reading"] += 1
        if held or exc:
            log.warning(
                "worker %d gone (%s); reclaimed %d leased sessions", wid, exc or "closed", len(held)
            )
        if worker.helloed:
            self.schedule_config()
        self.schedule_pump()

    # -- configuration of workers --------------------------------------------------------
    def _split_position(self, worker: Worker) -> tuple[int, int]:
        """(workers, index) a worker splits each slice's maxWaiting by.

        Only workers that serve clients (hold the listener) share the queue bounds;
        any other connected worker is placed as one more after them.  So peers that
        merely say HELLO cannot dilute the serving workers' shares.
        """
        serving = sorted(w.id for w in self.workers.values() if w.serving and w.helloed)
        if worker.serving:
            return len(serving), serving.index(worker.id)
        return len(serving) + 1, len(serving)

    def _send_config(self, worker: Worker, workers: int, index: int) -> None:
        worker.channel.send(
            control.ConfigMsg(
                self.generation,
                self.policy.to_wire(),
                worker.id,
                workers,
                index,
                control.REVISION,
            )
        )

    def schedule_config(self) -> None:
        """Send CONFIG to every worker once, at the end of this loop iteration (a burst of
        joins, leaves and reloads then costs one round with the final split)."""
        if not self._config_scheduled and self._loop is not None:
            self._config_scheduled = True
            self._loop.call_soon(self.broadcast_config)

    def broadcast_config(self) -> None:
        self._config_scheduled = False
        for worker in [w for w in self.workers.values() if w.helloed]:
            if not worker.channel.closed:
                self._send_config(worker, *self._split_position(worker))

    def set_policy(self, policy: Policy) -> None:
        self.ledger.set_policy(policy)
        self.generation += 1
        self.schedule_config()
        self.enforce_cap()
        self.schedule_pump()

    # -- housekeeping ----------------------------------------------------------------------
    def _sweep(self) -> None:
        """Once a second: drop control peers silent past ``preambleTimeout``, forget unused
        services."""
        assert self._loop is not None
        now = self._loop.time()
        deadline = self.policy.limits.preamble_timeout  # as for a registration's first line
        for worker in list(self.workers.values()):
            if not worker.helloed and now - worker.connected > deadline:
                self._violation(worker.id, "hello", f"no HELLO within {deadline:g}s")
        ttl = self.policy.limits.forget_services_after
        forgotten = self.ledger.sweep_services(time.monotonic(), ttl)
        self.counters.services_forgotten += len(forgotten)
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    def enforce_cap(self) -> None:
        """Give back sessions beyond ``limits.maxSessions`` (``capacity.py``): idle ones are
        retired now, leased ones recalled and retired once idle; no request is touched."""
        excess = capacity.surplus(self.ledger)
        if not excess:
            return
        for sess in capacity.idle_victims(self.ledger, excess):
            self.ledger.drop_session(sess.id)
            with contextlib.suppress(OSError):
                os.write(sess.fd, wire.RETIRE_LINE)
            self._close_session(sess, DropReason.CAPPED)
        for action in capacity.recall_plan(self.ledger, capacity.surplus(self.ledger)):
            self._recall(action)

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
            worker = self.workers.get(wid)
            if worker is None:  # gone while this pump ran: its leases were reclaimed
                continue
            channel = worker.channel
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
                        g.asked,
                    )
                    for g in batch
                ]
                channel.send(control.Grant(leases), [g.session.fd for g in batch])
            self.counters.grants += len(actions)
            self.counters.asks["granted"] += sum(1 for g in actions if g.asked)
        # Asks not granted: probe workers for idle sessions, or refuse (after the GRANTs
        # above, so a worker learns what it got before what it did not).
        probes, refusals = asking.settle(self.ledger)
        for action in probes:
            self._recall(action)
        for refusal in refusals:
            worker = self.workers.get(refusal.worker)
            if worker is not None:
                worker.channel.send(control.Refuse(refusal.key[0], refusal.key[1], refusal.n))
                self.counters.asks["refused"] += refusal.n
        for action in lending.recall_plan(self.ledger):
            self._recall(action)
        registered = len(self.ledger.sessions)
        if registered != self._announced:
            self.announce(registered)

    def _recall(self, action: RecallAction) -> None:
        """Send a planned RECALL (the plan already counted it in ``ledger.recalls``)."""
        worker = self.workers.get(action.worker)
        if worker is not None:
            worker.channel.send(control.Recall(action.service, action.n, action.slice, action.now))
            if action.now:
                self.counters.probes += action.n
            else:
                self.counters.recalls += action.n

    def announce(self, registered: int) -> None:
        """Tell workers how many sessions are registered (their /readyz depends on it)."""
        self._announced = registered
        for worker in list(self.workers.values()):
            worker.channel.send(control.Stats({"registered": float(registered)}))


def _shutdown(fd: int) -> None:
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)
