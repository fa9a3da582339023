"""Shared basics of the local control-plane harness: its errors, its progress log and helpers
for waiting on a condition and picking free loopback ports."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
LogFn = Callable[[str], None]


class HarnessError(RuntimeError):
    """The control plane could not be built, started or stopped."""


class ToolchainMissingError(HarnessError):
    """A tool needed to build or run the control plane (go, openssl, bash) is missing."""


def _stderr_log(message: str) -> None:
    print(f"[k8s-harness] {message}", file=sys.stderr, flush=True)


def poll(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something other than ``None``; return that.

    Exceptions raised by ``probe`` propagate. Raises :class:`TimeoutError` after ``timeout``
    seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _free_port(taken: set[int]) -> int:
    """A TCP port on 127.0.0.1 that is free right now and not in ``taken``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise HarnessError("could not find a free port on 127.0.0.1")
