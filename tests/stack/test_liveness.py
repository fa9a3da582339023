"""Liveness that means something (issue 12): the fd-limit outage, /healthz and /readyz.

Real processes.  The sidecar runs under a low descriptor limit (both soft and
hard, so it cannot raise it) to replay "a sidecar under ulimit -n 256 with 300
client connections lost its control connection and never reconnected".
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.helpers import free_port, http_get, wait_for
from tests.stack.conftest import Stack, metric
from tests.stack.test_stack import request

pytestmark = pytest.mark.slow


class Sidecar:
    """`backdial sidecar` as a process with its own descriptor limit."""

    def __init__(self, stack: Stack, nofile: int, *extra: str) -> None:
        self.admin = f"127.0.0.1:{free_port()}"
        self.log = stack.run_dir / "sidecar-limited.log"
        args = [
            sys.executable, "-m", "backdial.cli", "sidecar", "--run-dir", str(stack.run_dir),
            "--listen", f"127.0.0.1:{stack.port}", "--admin", self.admin, *extra,
        ]  # fmt: skip

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )  # fmt: skip

    def url(self, path: str) -> str:
        return f"http://{self.admin}{path}"

    def status(self, path: str) -> int:
        return http_get(self.url(path))[0]

    def metric(self, name: str, **labels: str) -> float:
        return metric(http_get(self.url("/metrics"))[1].decode(), name, **labels)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def limited(stack: Stack) -> Iterator[list[Sidecar]]:
    made: list[Sidecar] = []
    yield made
    for s in made:
        s.stop()


def _connect_many(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _start(stack: Stack, limited: list[Sidecar], nofile: int, *extra: str) -> Sidecar:
    stack.config_path.write_text("slices: [{name: default, share: 100}]\n")
    stack.restart_acceptor()
    stack.service("main", 4)
    wait_for(lambda: stack.registered() == 4, what="4 sessions")
    side = Sidecar(stack, nofile, *extra)
    limited.append(side)
    wait_for(lambda: side.status("/readyz") == 200, timeout=20, what="sidecar ready")
    return side


def test_worker_reconnects_through_emfile(stack: Stack, limited: list[Sidecar]) -> None:
    """No reserve: clients take every descriptor, then the acceptor restarts.  The worker
    cannot even create a socket (EMFILE), keeps trying, and recovers once clients leave."""
    side = _start(stack, limited, 160, "--fd-reserve", "0")
    clients = _connect_many(stack.port, 300)  # beyond the limit: libuv drops the excess
    # At the limit even the admin port is unreachable: the log is the witness.
    stack.acceptor.stop()
    stack.restart_acceptor()
    wait_for(lambda: "Too many open files" in side.output(), timeout=20, what="EMFILE on reconnect")
    for s in clients:
        s.close()
    wait_for(lambda: side.status("/readyz") == 200, timeout=30, what="back after the outage")
    assert side.metric("backdial_sidecar_control_connects_total") >= 2
    assert side.metric("backdial_sidecar_control_connect_failures_total") > 0
    assert request(stack.port, "/")[0] == 200
    assert side.status("/healthz") == 200


def test_connections_beyond_the_reserve_get_503(stack: Stack, limited: list[Sidecar]) -> None:
    side = _start(stack, limited, 200)  # default reserve 128: about 60 client connections
    clients = _connect_many(stack.port, 150)
    wait_for(
        lambda: side.metric("backdial_sidecar_connections_refused_total", reason="fd_limit") > 0,
        what="refusals counted",
    )
    # The refused ones got an answer, not a silent close.
    answered = 0
    for s in clients:
        with contextlib.suppress(TimeoutError, OSError):
            s.settimeout(0.01)
            if s.recv(100).startswith(b"HTTP/1.1 503"):
                answered += 1
    assert answered == side.metric("backdial_sidecar_connections_refused_total", reason="fd_limit")
    assert side.status("/readyz") == 503  # cannot serve everyone now
    assert side.status("/healthz") == 200  # but nothing to restart
    # The reserve kept the control connection usable: an acceptor restart is survived.
    stack.acceptor.stop()
    stack.restart_acceptor()
    wait_for(
        lambda: side.metric("backdial_sidecar_control_connects_total") == 2,
        timeout=20,
        what="reconnected despite the clients",
    )
    for s in clients:
        s.close()
    wait_for(lambda: side.status("/readyz") == 200, timeout=20, what="ready again")
    assert request(stack.port, "/")[0] == 200
    assert side.output().count("refusing client connections (503)") == 1  # once per interval


def test_healthz_fails_without_the_acceptor(stack: Stack, limited: list[Sidecar]) -> None:
    side = _start(stack, limited, 1024, "--max-disconnected", "1")
    stack.acceptor.stop()
    wait_for(lambda: side.status("/healthz") == 503, what="wedged without control")
    assert "no control connection" in http_get(side.url("/healthz"))[1].decode()
    assert side.status("/readyz") == 503
    stack.restart_acceptor()
    wait_for(lambda: side.status("/healthz") == 200, timeout=20, what="healthy again")


def test_healthz_fails_after_an_event_loop_stall(stack: Stack, limited: list[Sidecar]) -> None:
    side = _start(stack, limited, 1024, "--max-loop-lag", "1")
    side.proc.send_signal(signal.SIGSTOP)  # a stall of the whole loop, as a blocking call
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # the stall itself is the test input
        time.sleep(0.1)
    side.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: side.status("/healthz") == 503, what="stall reported")
    assert "event loop stalled" in http_get(side.url("/healthz"))[1].decode()
    assert "event loop stalled" in side.output()
