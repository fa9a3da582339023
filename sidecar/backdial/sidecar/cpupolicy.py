"""The worker thread's CPU scheduling policy while requests wait for sessions.

A request waits (or asks the acceptor) only when every session of its key is busy:
the services are the bottleneck; when, besides, the worker's CPUs have no idle time
(``cpuload.py``), what limits them is the CPU.  A sidecar worker usually shares CPUs
with them, and a normal (``SCHED_OTHER``) thread woken by a socket preempts whatever
runs on its CPU, so every response a service writes wakes the worker in the middle of
the service's own loop turn and the two ping-pong on the CPU: context switches, cache
refills, and CPU taken from the part that limits throughput.  Under ``SCHED_BATCH`` the
kernel does not preempt on wake-up: the service finishes its turn and the worker then
finds its responses ready together.  The worker goes back to ``SCHED_OTHER`` at the
first sample that finds room on its CPUs, or after a whole sampling window in which
nothing waited (``--queued-cpu-policy``, docs/engine.md).

``wanted`` is the decision, ``CpuSwitch`` the thin shell the Python engine's pool calls
when a request starts to wait (``waits``: only that can start batch) and at each sample
of the CPUs (``sample``, every ``cpuload.WINDOW``: only then can batch end); the native
engine does the same in ``sidecar/engine/src/cpu.rs``.  Either makes one
``sched_setscheduler`` call per change, never one per request.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from typing import Protocol

log = logging.getLogger("backdial.sidecar")


class CpuPolicy(enum.Enum):
    """What ``--queued-cpu-policy`` names: the policy while requests wait."""

    AUTO = "auto"  # BATCH on the native engine, NORMAL on the python engine
    NORMAL = "normal"  # SCHED_OTHER throughout: the switch is off
    BATCH = "batch"  # SCHED_BATCH while requests wait or ask, SCHED_OTHER otherwise

    def resolved(self, native: bool) -> CpuPolicy:
        """AUTO made concrete for an engine.  The premise (waiting requests mean the
        services are the slower part) holds for the native engine, which costs less CPU
        per request than the services behind it; the python engine costs more than they
        do, and under BATCH it lost about 7 % at 64 clients on 16 sessions (docs/engine.md)."""
        if self is CpuPolicy.AUTO:
            return CpuPolicy.BATCH if native else CpuPolicy.NORMAL
        return self

    @property
    def sched(self) -> int:
        return os.SCHED_BATCH if self is CpuPolicy.BATCH else os.SCHED_OTHER


def wanted(queued: CpuPolicy, contended: bool, waited: bool, held: bool) -> CpuPolicy:
    """The policy for a worker whose CPUs were *contended* in the last sample
    (``cpuload.py``) and whose requests waited or asked for a session in this sampling
    window (*waited*) or the one before (*held*).  A queue that empties for a moment
    (the clients' next requests still on their way) does not end batch, or the worker
    would flap between policies many times a second; a full window without waiting does."""
    return queued if contended and (waited or held) else CpuPolicy.NORMAL


class SwitchCounts(Protocol):
    cpu_policy_switches: int
    cpu_policy_refused: int


class CpuSwitch:
    """Applies ``wanted`` to the calling thread (the worker's loop) on a change only.

    A refused switch (a seccomp profile that forbids ``sched_setscheduler``, say) turns
    the switch off for the worker, logged once, instead of being retried per request.
    """

    __slots__ = ("applied", "contended", "counts", "held", "queued", "waited")

    def __init__(self, queued: CpuPolicy, counts: SwitchCounts | None = None) -> None:
        self.queued = queued.resolved(native=False)
        self.applied = CpuPolicy.NORMAL
        self.contended = False  # the worker's CPUs, as last sampled (cpuload.CpuWatch)
        self.waited = self.held = False  # requests waited this window, the one before
        self.counts = counts

    def waits(self) -> None:
        """A request started to wait or ask for a session."""
        if not self.waited:
            self.waited = True
            self._apply()

    def sample(self, contended: bool, waiting: int) -> None:
        """A sample of the worker's CPUs (every ``cpuload.WINDOW``), with the requests
        waiting or asking now: a new window."""
        self.contended = contended
        self.held, self.waited = self.waited, waiting > 0
        self._apply()

    def _apply(self) -> None:
        if self.queued is CpuPolicy.NORMAL and self.applied is CpuPolicy.NORMAL:
            return  # off (or refused): nothing to decide
        want = wanted(self.queued, self.contended, self.waited, self.held)
        if want is self.applied:
            return
        try:
            os.sched_setscheduler(0, want.sched, os.sched_param(0))
        except OSError as exc:
            log.warning(
                "--queued-cpu-policy %s refused (%s); staying normal", self.queued.value, exc
            )
            self.queued = CpuPolicy.NORMAL
            if self.counts is not None:
                self.counts.cpu_policy_refused += 1
            if self.applied is not CpuPolicy.NORMAL:
                self.applied = CpuPolicy.NORMAL
                # Going back to normal is always allowed; nothing to do if it was not.
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            return
        self.applied = want
        if self.counts is not None:
            self.counts.cpu_policy_switches += 1
