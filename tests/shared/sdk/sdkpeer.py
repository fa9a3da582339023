"""Test helpers for the SDK tests: a registration peer playing acceptor + proxy.

``FakeAcceptor`` stands in for the real acceptor (built in parallel in
``acceptor/``): it listens on a real UNIX or TCP socket, answers the
registration preamble with ``OK`` or a chosen ``ERR`` exactly as
``backdial.wire`` specifies, keeps registered sessions idle in a FIFO pool,
honours ``RETIRE`` (drops the session from the pool and closes it), and plays
the proxy by leasing a session, writing a real HTTP/1.1 request onto it and
parsing the real response.  Nothing in the SDK is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httptools
import pytest

from backdial import wire

ROOT = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run one async test body with a hard time bound."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@dataclass
class PeerResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    saw_retire: bool = False
    closed: bool = False  # the service closed the session after this response


class PeerSession(asyncio.Protocol):
    """One session as the acceptor/proxy sees it."""

    def __init__(self, peer: FakeAcceptor) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.registered = False
        self.preamble: wire.Preamble | None = None
        self.retired = False
        self.leased = False  # a proxy holds it: RETIRE then means "answer, then go"
        self.eof = asyncio.Event()
        self._pending: asyncio.Future[PeerResponse] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._resp: PeerResponse | None = None
        self._head_request = False

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.connections.discard(self)
        self.peer._drop(self)
        self.eof.set()
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(ConnectionError("session closed before the response"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.registered:
            self._registration()
            return
        self._process()

    def _registration(self) -> None:
        assert self.transport is not None
        try:
            end = wire.find_line(self.buf)
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end:]
            self.preamble = wire.parse_preamble(line)
        except wire.PreambleError as exc:
            self.transport.write(wire.encode_err(exc.code, exc.message))
            self.transport.close()
            return
        self.peer.preambles.append(self.preamble)
        code = self.peer.next_refusal()
        if code is not None:
            self.transport.write(wire.encode_err(wire.ErrCode(code), "refused by test peer"))
            self.transport.close()
            return
        self.registered = True
        self.peer.session_counter += 1
        self.transport.write(wire.encode_ok(self.peer.session_counter, 1))
        self.peer._add_idle(self)
        if self.buf:
            self._process()

    def _process(self) -> None:
        while self.buf:
            if self.buf.startswith(wire.RETIRE_LINE):
                self.buf = self.buf[len(wire.RETIRE_LINE) :]
                self.retired = True
                self.peer.retires += 1
                if not self.leased:
                    # Idle: the acceptor forgets the session and closes it.
                    self.peer._drop(self)
                    if self.transport is not None:
                        self.transport.close()
                    return
                continue
            if wire.RETIRE_LINE.startswith(self.buf):
                return  # a partial RETIRE line; wait for the rest
            if self._parser is None:
                self.peer.protocol_errors.append(self.buf[:80])
                self.buf = b""
                return
            # A RETIRE line may follow a response in the same read (the session went
            # idle and retired at once); the parser must not see it.  A real proxy
            # knows where the response ends; this peer simply looks for the line.
            cut = self.buf.find(wire.RETIRE_LINE)
            if cut > 0:
                data, self.buf = self.buf[:cut], self.buf[cut:]
            else:
                data, self.buf = self.buf, b""
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self.peer.protocol_errors.append(repr(exc).encode())
                if self._pending is not None and not self._pending.done():
                    self._pending.set_exception(exc)

    # httptools response callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._resp is not None
        self._resp.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        assert self._resp is not None and self._parser is not None
        self._resp.status = self._parser.get_status_code()
        self.peer.heads += 1
        self.peer._changed.set()
        if self._head_request:
            self.on_message_complete()  # a HEAD response has no body, whatever it declares

    def on_body(self, body: bytes) -> None:
        assert self._resp is not None
        self._resp.body += body

    def on_message_complete(self) -> None:
        if self._resp is None or self._parser is None:
            return  # after a HEAD response ended at its head
        resp = self._resp
        resp.saw_retire = self.retired
        resp.closed = not self._parser.should_keep_alive()
        pending = self._pending
        self._parser = None
        self._resp = None
        self._pending = None
        if pending is not None and not pending.done():
            pending.set_result(resp)

    async def exchange(self, request: bytes) -> PeerResponse:
        """Write one request and read its response (the proxy's job)."""
        assert self.transport is not None and self._pending is None
        loop = asyncio.get_running_loop()
        self._pending = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._resp = PeerResponse(0, {}, b"")
        self._head_request = request.startswith(b"HEAD ")
        self.transport.write(request)
        if self.buf:
            self._process()
        return await self._pending


def build_request(
    method: str = "GET",
    target: str = "/",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: backdial.test"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if chunked:
        lines.append("transfer-encoding: chunked")
        payload = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + 7]), body[i : i + 7])
            for i in range(0, len(body), 7)
        )
        payload += b"0\r\n\r\n"
    else:
        if body or method in ("POST", "PUT"):
            lines.append(f"content-length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class FakeAcceptor:
    """Stands in for the acceptor built in parallel: registration + proxy roles."""

    def __init__(self, *, tcp: bool = False) -> None:
        self.tcp = tcp
        self.dir = tempfile.mkdtemp(prefix="bdsdk-")
        self.path = os.path.join(self.dir, "register.sock")
        # Removed even when a failing test never reaches cleanup().
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[PeerSession] = set()
        self.idle: deque[PeerSession] = deque()
        self.preambles: list[wire.Preamble] = []
        self.refusals: deque[str] = deque()
        self.refuse_always: str | None = None
        self.retires = 0
        self.session_counter = 0
        self.protocol_errors: list[bytes] = []
        self.heads = 0  # response heads received (a response has begun)
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}" if self.tcp else f"unix://{self.path}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.tcp:
            self.server = await loop.create_server(
                lambda: PeerSession(self), "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self.server.sockets[0].getsockname()[1]
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.server = await loop.create_unix_server(lambda: PeerSession(self), self.path)

    async def stop(self) -> None:
        """Crash-like stop: close the listener and every session."""
        if self.server is not None:
            self.server.close()
            self.server = None
        aborted = list(self.connections)
        for conn in aborted:
            if conn.transport is not None:
                conn.transport.abort()
        self.idle.clear()
        async with asyncio.timeout(5):  # connection_lost has run for every one of them
            await asyncio.gather(*(conn.eof.wait() for conn in aborted))
        if not self.tcp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def next_refusal(self) -> str | None:
        if self.refusals:
            return self.refusals.popleft()
        return self.refuse_always

    def _add_idle(self, s: PeerSession) -> None:
        self.idle.append(s)
        self._changed.set()

    def _drop(self, s: PeerSession) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(s)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._changed.wait()

    async def wait_idle(self, n: int, within: float = 10.0) -> None:
        await self.wait_for(lambda: len(self.idle) >= n, within)

    async def lease(self, within: float = 10.0) -> PeerSession:
        await self.wait_for(lambda: bool(self.idle), within)
        s = self.idle.popleft()
        s.leased = True
        return s

    def release(self, s: PeerSession, resp: PeerResponse) -> None:
        s.leased = False
        if resp.closed or s.retired or s.transport is None or s.transport.is_closing():
            if s.transport is not None:
                s.transport.close()
            return
        self._add_idle(s)

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        chunked: bool = False,
        within: float = 10.0,
    ) -> PeerResponse:
        s = await self.lease(within)
        async with asyncio.timeout(within):
            resp = await s.exchange(build_request(method, target, headers, body, chunked))
        self.release(s, resp)
        return resp

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


class Child:
    """A started ``python -m backdial.sdk.main`` process; stderr is collected by a thread
    (so the child never blocks on a full pipe and tests never block on a read)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    async def wait_line(self, needle: str, within: float = 10.0) -> str:
        """Wait until a stderr line contains *needle*; returns that line."""
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.proc.poll() is not None and not self._thread.is_alive():
                    raise AssertionError(f"exited without printing {needle!r}:\n{self.stderr}")
                await asyncio.sleep(0.02)

    async def wait_exit(self, within: float = 10.0) -> int:
        # Polling, not a thread blocked in wait(): a thread would outlive a
        # timed-out test and hold asyncio.run's executor shutdown hostage.
        async with asyncio.timeout(within):
            while self.proc.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        self._thread.join(timeout=2)
        assert self.proc.returncode is not None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._thread.join(timeout=2)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class Procs:
    """Subprocesses started by a test; all are killed at teardown."""

    started: list[Child] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> Child:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), full_env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        for name in (
            "BACKDIAL_REGISTER",
            "BACKDIAL_SESSIONS",
            "BACKDIAL_SERVICE",
            "BACKDIAL_TOKEN",
        ):
            full_env.pop(name, None)
        full_env.update(env or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", "backdial.sdk.main", *args],
            cwd=str(ROOT),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        child = Child(proc)
        self.started.append(child)
        return child

    def cleanup(self) -> None:
        for child in self.started:
            child.kill()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()
