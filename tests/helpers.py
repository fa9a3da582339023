"""Process and socket helpers shared by the test suites (real processes, loopback only)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free now (``backdial up`` uses admin and admin+1)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(url: str) -> Any:
    status, body, _ = http_get(url)
    assert status == 200, (status, body)
    return json.loads(body)


def metric(text: str, name: str, **labels: str) -> float:
    """One series of a Prometheus exposition, by name and exact labels (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def series(selector: str) -> tuple[str, dict[str, str]]:
    """``name{a="x",b="y"}`` as (name, labels)."""
    name, _, rest = selector.partition("{")
    return name, dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', rest))


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            if pred():
                return
        except (OSError, AssertionError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {what}" + (f" (last error: {last})" if last else "")
    )


class Proc:
    """A backdial subprocess whose output is kept for failure reports."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self._fh = log.open("wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.p = subprocess.Popen(
            [sys.executable, "-m", "backdial.cli", *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        if self.alive():
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._fh.close()
        return self.p.returncode

    def output(self) -> str:
        if not self._fh.closed:  # closed once stopped
            self._fh.flush()
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def processes(tmp: Path) -> Iterator[Callable[..., Proc]]:
    """Start backdial subprocesses; all are stopped (and their logs shown) at exit."""
    started: list[Proc] = []

    def start(*args: str, name: str = "proc", env: dict[str, str] | None = None) -> Proc:
        proc = Proc(list(args), tmp / f"{name}-{len(started)}.log", env)
        started.append(proc)
        return proc

    try:
        yield start
    except BaseException:
        for proc in started:
            sys.stderr.write(
                f"\n----- {proc.args[0]} log ({proc.log}) -----\n{proc.output()[-4000:]}"
            )
        raise
    finally:
        for proc in reversed(started):
            proc.stop()


def register(path: Path | str, line: bytes, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """Open one registration connection, send *line*, return the socket and the reply line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    if line:
        sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        reply += chunk
    return sock, reply
