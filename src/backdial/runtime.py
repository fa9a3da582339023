"""Process plumbing shared by every component: loops, logging, addresses, env.

Every long-running command runs its main coroutine through :func:`run`, which
uses uvloop and turns SIGTERM/SIGINT into a graceful-stop event.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import uvloop

log = logging.getLogger("backdial")


class ConfigError(Exception):
    """Bad settings: the message is printed as one line and the process exits 1."""


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a ConfigError (one line, exit 1), not exit 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def env(name: str, default: str | None = None) -> str | None:
    """``BACKDIAL_<NAME>`` from the environment, else *default*."""
    return os.environ.get("BACKDIAL_" + name, default)


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def raise_nofile() -> None:
    """Sessions are file descriptors; allow as many as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    """Run ``main(stop_event)`` on uvloop; SIGTERM/SIGINT set the event."""

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(name: str) -> None:
            log.info("%s: %s", name, "already stopping" if stop.is_set() else "stopping")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        return await main(stop)

    raise_nofile()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(wrapper())
        except KeyboardInterrupt:
            return 130


def fail(message: str) -> int:
    print(f"backdial: error: {message}", file=sys.stderr)
    return 1
