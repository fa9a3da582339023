"""Which relay engine a sidecar worker runs, and building a worker's pool and listener on it.

``native`` is the compiled engine (the optional ``backdial-engine`` package, module
``backdial_engine``): it accepts, parses, leases, relays and releases the common
requests without running Python, and hands everything else to the Python path at a
request boundary.  ``python`` is the pure-Python path alone (``proxy.ClientProtocol``
on uvloop and httptools).  ``auto`` (the default) is native when the package is
installed, else python; ``--engine`` / ``BACKDIAL_ENGINE`` choose explicitly, and a
worker logs which one it runs.  docs/engine.md describes the split.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from backdial.runtime import ConfigError
from backdial.sidecar import nativeproxy
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.cpupolicy import CpuSwitch
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.listener import ListenerState
from backdial.sidecar.nativepool import NativeLeasePool
from backdial.sidecar.proxy import ClientProtocol, make_protocol_factory
from backdial.sidecar.sessionconn import wrap_lease
from backdial.sidecar.stats import ProxyStats

MODULE = "backdial_engine"


class Kind(enum.StrEnum):
    AUTO = "auto"
    NATIVE = "native"
    PYTHON = "python"


def native_module() -> ModuleType | None:
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        return None


def choose(requested: str) -> tuple[Kind, str]:
    """(engine to run, why); ``native`` without the package is a configuration error."""
    kind = Kind(requested)
    if kind is Kind.PYTHON:
        return Kind.PYTHON, "--engine python"
    mod = native_module()
    if mod is not None:
        return Kind.NATIVE, f"{MODULE} {mod.VERSION}"
    if kind is Kind.NATIVE:
        raise ConfigError(
            f"--engine native: the {MODULE} package is not installed "
            "(pip install ./sidecar/engine, docs/engine.md)"
        )
    return Kind.PYTHON, f"{MODULE} not installed"


@dataclass
class Worker:
    """One worker's pool, counters and (once ``listen`` ran) listener state."""

    kind: Kind
    pool: LeasePool
    stats: ProxyStats
    engine: Any = None
    state: ListenerState | None = None
    factory: Callable[[], ClientProtocol] | None = None

    def listen(self, settings: ProxySettings) -> tuple[Callable[[], ClientProtocol], ListenerState]:
        if self.kind is Kind.NATIVE:
            assert isinstance(self.pool, NativeLeasePool)
            assert isinstance(self.stats, nativeproxy.NativeStats)
            self.factory, self.state = nativeproxy.start(self.pool, settings, self.stats)
        else:
            self.factory, self.state = make_protocol_factory(self.pool, settings, self.stats)
        return self.factory, self.state

    async def serve(self, listener: socket.socket) -> Any:
        """Accept clients from *listener*; the returned server's ``close`` stops that."""
        assert self.factory is not None and self.state is not None
        if self.kind is Kind.NATIVE:
            assert isinstance(self.state, nativeproxy.NativeListener)
            return nativeproxy.serve(self.state, listener)
        loop = asyncio.get_running_loop()
        return await loop.create_server(self.factory, sock=listener, backlog=4096)


def worker(kind: Kind, run_dir: Path, settings: ProxySettings, name: str = "") -> Worker:
    """A worker's lease pool and counters on engine *kind* (call in the running loop)."""
    if kind is Kind.NATIVE:
        return native_worker(run_dir, settings, name)
    holder: list[LeasePool] = []
    pool = LeasePool(run_dir, lambda lease: wrap_lease(lease, holder[0]), name)
    holder.append(pool)
    stats = ProxyStats()
    pool.cpu = CpuSwitch(settings.queued_cpu_policy, stats)
    return Worker(kind, pool, stats)


def native_worker(
    run_dir: Path,
    settings: ProxySettings,
    name: str = "",
    pool_class: type[NativeLeasePool] = NativeLeasePool,
) -> Worker:
    """A worker on a new engine: its pool (the engine's loop registered) and counters."""
    mod = native_module()
    assert mod is not None, "backdial_engine is not installed"
    engine = mod.Engine(nativeproxy.engine_settings(settings))
    pool = pool_class(run_dir, engine, name)
    engine.set_hooks(nativeproxy.EngineHooks(pool))
    asyncio.get_running_loop().add_reader(engine.fileno(), engine.run)
    return Worker(Kind.NATIVE, pool, nativeproxy.NativeStats(engine), engine)
