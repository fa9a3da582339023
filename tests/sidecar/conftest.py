"""Harness for the sidecar proxy tests: the production path with a recording service.

``ProxyRunner`` runs the proxy, the production ``LeasePool`` and a real
``Acceptor`` in one uvloop thread: leases travel over ``control.sock`` with
SCM_RIGHTS, capacity and queues are the ledger's, nothing is stood in.  The
pool is a ``RecordingPool``, which only notes each lease attempt, release and
loss before doing exactly what ``LeasePool`` does.  ``Backend`` plays the
service: it registers its sessions over ``register.sock`` with the BDREG/1
preamble, keeps that many registered (a closed session is replaced, as the
SDK does), and serves each on a small blocking HTTP/1.1 thread that records
every byte it receives.  Clients are real: raw sockets, httpx and curl.
``test_proxy_e2e.py`` runs the same against an acceptor process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from backdial.acceptor.server import Acceptor
from backdial.control import ReleaseState
from backdial.policy import Policy, policy_from_data
from backdial.sidecar import engine
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.lease import LeasedConn
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.nativepool import NativeLeasePool
from backdial.sidecar.proxy import make_protocol_factory
from backdial.sidecar.sessionconn import wrap_lease
from backdial.sidecar.stats import ProxyStats
from backdial.wire import RETIRE_LINE, Preamble, parse_reply

TIMEOUT = 5.0
# The engine under test: BACKDIAL_ENGINE as the sidecar reads it (auto = native when
# installed); scripts/test runs the suite once more with BACKDIAL_ENGINE=python.
ENGINE, _ = engine.choose(os.environ.get("BACKDIAL_ENGINE", "auto"))


# -- the service side -----------------------------------------------------------------------------
class _Headers:
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class Received(_Headers):
    session: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes


class Backend:
    """A service: HTTP/1.1 server threads on its sessions; behaviour chosen by the request path."""

    def __init__(self) -> None:
        self.stopping = False
        self.lock = threading.Lock()
        self.raw: list[bytes] = []  # every byte received, per recv
        self.requests: list[Received] = []
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.gate = threading.Event()  # /wait blocks until set
        self.gate.set()
        self.flaky: set[str] = set()  # /flaky?id=X dies on the first attempt per id

    @property
    def raw_bytes(self) -> bytes:
        with self.lock:
            return b"".join(self.raw)

    def keep(self, register: Path, sessions: int, service: str) -> None:
        """Register *sessions* sessions of *service*; each one that ends is replaced."""
        for _ in range(sessions):
            self.register(register, service)

    def register(self, register: Path, service: str, instance: str = "i1") -> int:
        """One session over the BDREG/1 preamble; its id, or 0 when refused."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(register))
            sock.sendall(Preamble(service=service, instance=instance).encode())
            line = b""
            while not line.endswith(b"\n"):  # nothing follows OK until a request is leased
                data = sock.recv(1)
                if not data:
                    break
                line += data
            reply = parse_reply(line)
        except (OSError, ValueError):
            sock.close()
            return 0
        if not reply.ok:
            sock.close()
            return 0
        self.attach(sock, reply.session, lambda: self.register(register, service, instance))
        return reply.session

    def attach(
        self, sock: socket.socket, session: int, replace: Callable[[], object] | None = None
    ) -> None:
        sock.settimeout(TIMEOUT * 2)
        self.socks.append(sock)
        t = threading.Thread(target=self._serve, args=(sock, session, replace), daemon=True)
        self.threads.append(t)
        t.start()

    def close(self) -> None:
        self.stopping = True
        self.gate.set()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self.threads:
            t.join(timeout=2)

    def _recv(self, sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        if data:
            with self.lock:
                self.raw.append(data)
        return data

    def _serve(
        self, sock: socket.socket, session: int, replace: Callable[[], object] | None
    ) -> None:
        try:
            self._serve_session(sock, session)
        finally:
            sock.close()
            if replace is not None and not self.stopping:
                replace()  # a service keeps its declared number of sessions

    def _serve_session(self, sock: socket.socket, session: int) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = self._recv(sock)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.split(": ", 1)) for x in lines[1:]]
                req = Received(session, method, target, headers, b"", head)  # type: ignore[arg-type]
                if target.startswith("/die-unread"):
                    # Reads none of the body, waits for the gate, then dies (kill -9 mid-request).
                    self.gate.wait(TIMEOUT * 2)
                    return
                length = req.header("content-length")
                if req.header("transfer-encoding") == "chunked":
                    body, buf = self._read_chunked(sock, buf)
                else:
                    need = int(length or 0)
                    while len(buf) < need:
                        data = self._recv(sock)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:need], buf[need:]
                req.body = body
                with self.lock:
                    self.requests.append(req)
                if not self._respond(sock, req):
                    return

    def _read_chunked(self, sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += self._recv(sock)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += self._recv(sock)
            if size == 0:
                return body, buf[2:]
            body += buf[:size]
            buf = buf[size + 2 :]

    def _respond(self, sock: socket.socket, req: Received) -> bool:
        """Write the response for *req*; False ends the session."""
        path, _, query = req.target.partition("?")
        args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        head_only = req.method == "HEAD"

        def send(status: str, body: bytes, extra: str = "", close: bool = False) -> None:
            hdr = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
            if close:
                hdr += "Connection: close\r\n"
            sock.sendall(hdr.encode() + b"\r\n" + (b"" if head_only else body))

        if path == "/die":
            sock.close()
            return False
        if path == "/flaky":
            with self.lock:
                first = args.get("id", "") not in self.flaky
                self.flaky.add(args.get("id", ""))
            if first:
                sock.close()
                return False
        if path == "/die-mid":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            sock.close()
            return False
        if path == "/wait":
            self.gate.wait(TIMEOUT * 2)
        if path == "/sleep":
            time.sleep(float(args.get("s", "0.5")))
        if path == "/big":
            n = int(args.get("n", "1000"))
            send("200 OK", b"x" * n)
            return True
        if path == "/bighead":  # one oversized response head, in one send
            n = int(args.get("n", "200000"))
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nX-Big: %s\r\nContent-Length: 2\r\n\r\nok" % (b"a" * n)
            )
            return True
        if path == "/chunked":
            parts = [b"hello ", b"chunked ", b"world"]
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
                + b"0\r\nX-Trailer: t\r\n\r\n"
            )
            return True
        if path == "/eof":
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            sock.close()
            return False
        if path == "/close":
            send("200 OK", b"closing", close=True)
            sock.close()
            return False
        if path == "/retire-before":
            sock.sendall(RETIRE_LINE)
            time.sleep(0.05)
            send("200 OK", b"after retire", close=True)
            return True  # keeps reading until the proxy closes it
        if path == "/retire-after":
            body = b"then retire"
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s%s"
                % (len(body), body, RETIRE_LINE)
            )
            return True
        if path == "/retire-split":
            body = b"then retire"
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s%s"
                % (len(body), body, RETIRE_LINE[:5])
            )
            time.sleep(0.05)
            sock.sendall(RETIRE_LINE[5:])
            return True
        if path == "/retire-idle":
            send("200 OK", b"ok")
            time.sleep(0.1)
            sock.sendall(RETIRE_LINE)
            return True
        if path == "/garbage-idle":
            send("200 OK", b"ok")
            time.sleep(0.1)
            sock.sendall(b"junk")
            return True
        if path == "/early-hints":
            sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            send("200 OK", b"hinted")
            return True
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            if code in (204, 304):
                sock.sendall(b"HTTP/1.1 %d X\r\n\r\n" % code)
            else:
                send(f"{code} X", b"status")
            return True
        if path == "/hop":
            send(
                "200 OK", b"hop", "Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
            )
            return True
        if path == "/garbage":
            sock.sendall(b"NOT-HTTP garbage\r\n\r\n")
            return True
        if path == "/ws-refuse":
            send("426 Upgrade Required", b"no")
            return True
        if path == "/ws":
            if (req.header("upgrade") or "").lower() != "websocket":
                send("400 Bad Request", b"not an upgrade")
                return True
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\nhello-from-ws"
            )
            while True:  # echo until EOF
                data = self._recv(sock)
                if not data:
                    return False
                sock.sendall(data.upper())
        info = {
            "session": req.session,
            "method": req.method,
            "target": req.target,
            "headers": req.headers,
            "body": req.body.decode("latin-1"),
        }
        send("200 OK", json.dumps(info).encode(), "Content-Type: application/json\r\n")
        return True


# -- the lease pool, as in production --------------------------------------------------------------
class NativeRecordingPool(NativeLeasePool):
    """``NativeLeasePool`` with the engine noting the same: every lease attempt (native or
    Python path), release and loss, in order."""

    def __init__(self, run_dir: Path, engine: Any, name: str = "") -> None:
        super().__init__(run_dir, engine, name)
        engine.set_record(True)

    @property
    def acquires(self) -> list[tuple[str, str]]:
        return list(self.engine.recorded()[0])

    @property
    def events(self) -> list[tuple[str, int, str]]:
        return list(self.engine.recorded()[1])

    def states(self, kind: str = "release") -> list[str]:
        return [state for k, _, state in self.events if k == kind]


class RecordingPool(LeasePool):
    """The production ``LeasePool``, noting what the proxy asks of it (then doing just that)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir, lambda lease: wrap_lease(lease, self), "test-worker")
        self.events: list[tuple[str, int, str]] = []  # ("release" | "lost", session, state)
        self.acquires: list[tuple[str, str]] = []  # (service, slice) of every lease attempt

    def try_acquire(self, service: str, slice_name: str) -> LeasedConn | None:
        self.acquires.append((service, slice_name))
        return super().try_acquire(service, slice_name)

    def release(self, conn: LeasedConn, state: ReleaseState) -> None:
        self.events.append(("release", conn.lease.session, state.value))
        super().release(conn, state)

    def lost(self, conn: LeasedConn, state: ReleaseState) -> None:
        self.events.append(("lost", conn.lease.session, state.value))
        super().lost(conn, state)

    def states(self, kind: str = "release") -> list[str]:
        return [state for k, _, state in self.events if k == kind]


def policy_for(
    policy: dict[str, Any] | None,
    max_waiting: int | None = None,
    queue_timeout: float | None = None,
    retry_after: int | None = None,
) -> Policy:
    """The acceptor's policy for a test: *policy*, with the queue limits of every slice set."""
    data = dict(policy or {})
    data.setdefault("slices", [{"name": "default", "share": 100}])
    data.setdefault("limits", {})
    data["limits"] = {**data["limits"], "leaseIdleRelease": "60s"}  # no sweeps mid-test
    if retry_after is not None:
        data["limits"]["retryAfter"] = retry_after
    for spec in data["slices"]:
        queue = dict(spec.get("queue") or {})
        if max_waiting is not None:
            queue["maxWaiting"] = max_waiting
        if queue_timeout is not None:
            queue["timeout"] = queue_timeout
        spec["queue"] = queue
    return policy_from_data(data, "test policy")


# -- running the proxy ----------------------------------------------------------------------------
class ProxyRunner:
    """The proxy, its real ``LeasePool`` and (unless one runs already) a real in-process
    acceptor, all on one uvloop in a background thread; the proxy listens on 127.0.0.1
    and the ``Backend`` registers its sessions at the acceptor like a service does."""

    def __init__(
        self,
        settings: ProxySettings,
        policy: Policy,
        sessions: int = 4,
        services: tuple[str, ...] = ("svc",),
        run_dir: Path | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.backend = backend or Backend()
        self.stats: ProxyStats = ProxyStats()
        self.listener: socket.socket | None = None
        self.own_acceptor = run_dir is None
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="bd-"))
        self.acceptor: Acceptor | None = None
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(TIMEOUT) or self._failed is not None:
            raise RuntimeError(f"proxy did not start: {self._failed!r}")
        if self.own_acceptor:
            for service in services:
                self.backend.keep(self.run_dir / "register.sock", sessions, service)
            total = sessions * len(services)
            if not self.wait_for(lambda: self._registered() == total):
                raise RuntimeError("the backend's sessions did not register")

    def _registered(self) -> int:
        assert self.acceptor is not None
        return len(self.acceptor.ledger.sessions)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._setup())
        except BaseException as exc:
            self._failed = exc
        self._ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        if self.own_acceptor:
            self.acceptor = Acceptor(self.run_dir, self.policy)
            await self.acceptor.start()
        if ENGINE is engine.Kind.NATIVE:
            worker = engine.native_worker(
                self.run_dir, self.settings, "test-worker", NativeRecordingPool
            )
            self.pool: Any = worker.pool
            self.stats = worker.stats
            self.pool.start()
            await asyncio.wait_for(self.pool.configured.wait(), TIMEOUT)
            worker.listen(self.settings)
            assert worker.state is not None
            self.state = worker.state
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.server = await worker.serve(self.listener)
            self.port = self.listener.getsockname()[1]
            return
        self.pool = RecordingPool(self.run_dir)
        self.pool.start()
        await asyncio.wait_for(self.pool.configured.wait(), TIMEOUT)
        factory, self.state = make_protocol_factory(self.pool, self.settings, self.stats)
        self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run *fn* (a plain function or a coroutine function) in the proxy's loop."""

        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(TIMEOUT * 3)

    def stop(self) -> None:
        self.backend.stopping = True

        async def down() -> None:
            self.server.close()
            await self.state.shutdown(0.5)
            await self.pool.close(1.0)
            if self.acceptor is not None:
                self.acceptor.close()
            me = asyncio.current_task()
            leftovers = [t for t in asyncio.all_tasks() if t is not me]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(down)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        if self.listener is not None:
            self.listener.close()
        self.backend.close()
        self.loop.close()
        if self.own_acceptor:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.call(predicate):
                return True
            time.sleep(0.01)
        return False


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., ProxyRunner]]:
    runners: list[ProxyRunner] = []

    def make(
        policy: dict[str, Any] | None = None, pool: dict[str, Any] | None = None, **settings: Any
    ) -> ProxyRunner:
        """*pool*: ``sessions`` per service, ``services``, and the queue limits
        ``max_waiting``, ``queue_timeout``, ``retry_after`` applied to every slice."""
        options = dict(pool or {})
        sessions = options.pop("sessions", 4)
        services = tuple(options.pop("services", ("svc",)))
        settings.setdefault("tick", 0.05)
        runner = ProxyRunner(
            ProxySettings(**settings), policy_for(policy, **options), sessions, services
        )
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyRunner]) -> ProxyRunner:
    return make_proxy()


# -- a raw HTTP/1.1 client ------------------------------------------------------------------------
@dataclass
class Response(_Headers):
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A socket with a persistent read buffer, for pipelining and byte-exact requests."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_response(self, head_only: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed; got {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        _, code, *reason = lines[0].split(" ", 2)
        headers = [tuple(x.split(": ", 1)) for x in lines[1:]]
        resp = Response(int(code), reason[0] if reason else "", headers, b"", head)  # type: ignore[arg-type]
        status = resp.status
        if head_only or status in (204, 304) or 100 <= status < 200:
            return resp
        if resp.header("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        raise EOFError("truncated chunked body")
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    if not self._fill():
                        raise EOFError("truncated chunk")
                if size == 0:
                    self.buf = self.buf[2:]
                    break
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
            resp.body = body
        elif resp.header("content-length") is not None:
            need = int(resp.header("content-length") or 0)
            while len(self.buf) < need:
                if not self._fill():
                    raise EOFError("truncated body")
            resp.body, self.buf = self.buf[:need], self.buf[need:]
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """True when the peer closed (EOF or reset) with nothing more to read."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_client() -> Iterator[Callable[[int], RawClient]]:
    clients: list[RawClient] = []

    def make(port: int) -> RawClient:
        c = RawClient(port)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
