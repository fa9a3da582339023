"""Whether the CPUs a worker may run on are saturated: the condition for batch.

``--queued-cpu-policy batch`` (``cpupolicy.py``) pays only when the CPU is the
bottleneck: then a worker that stops preempting the services saves them switches and
cache refills they would have spent CPU on.  When the services mostly wait (on a
database, a timer), requests still queue for sessions, but not preempting a service
that is busy with a burst of responses only delays the hand-off of the sessions it has
already answered on, and those sessions sit idle meanwhile: measured, 4 to 8 % below the
declared rate ``sessions ÷ service time`` with 16 and 64 sessions (docs/engine.md).

So the worker samples, every ``WINDOW`` seconds, the idle time of the CPUs in its
affinity mask (``/proc/stat``) and its cgroup's CPU throttling (cgroup v2
``cpu.stat``, when the container has a CPU limit): the CPUs become *contended* when
less than ``ENTER_IDLE`` of that CPU time was idle, or the cgroup was throttled, during
the last window, and stay so until ``LEAVE_SAMPLES`` windows in a row had more than
``LEAVE_IDLE`` idle.  The gap matters: under batch a saturated CPU still idles a little
(about 2 % in the suite, between the service's turn and the worker's), which at 10 ms
ticks moves around ``ENTER_IDLE``, and a single threshold made the worker flap between
policies every window; and a lull of a few hundred milliseconds (the suite's pause
between warm-up and measurement) is not a change of load.  Staying a little longer
costs nothing: on a CPU with room an idle CPU runs the woken worker at once, whatever
its policy.  Parsing and
the decision are pure functions; ``CpuWatch`` reads the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

WINDOW = 0.5  # seconds between samples: /proc/stat counts in 10 ms ticks
ENTER_IDLE = 0.05  # below this idle share of the worker's CPUs, they are saturated
LEAVE_IDLE = 0.25  # and they stay so until the idle share is above this
LEAVE_SAMPLES = 2  # in this many windows in a row
PROC_STAT = Path("/proc/stat")
CGROUP_CPU_STAT = Path("/sys/fs/cgroup/cpu.stat")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative counters at one moment."""

    busy: int  # ticks the CPUs ran anything (user, nice, system, irq, softirq, steal)
    idle: int  # ticks idle or waiting for I/O
    throttled_us: int  # the cgroup's throttled time (0 without a CPU limit)


def cpu_ticks(proc_stat: str, cpus: Iterable[int]) -> tuple[int, int]:
    """(busy, idle) ticks of *cpus*, summed, from the text of ``/proc/stat``."""
    want = {f"cpu{n}" for n in cpus}
    busy = idle = 0
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if name not in want:
            continue
        f = [int(x) for x in rest.split()]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        idle += f[3] + f[4]
        busy += f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return busy, idle


def throttled_us(cpu_stat: str) -> int:
    """``throttled_usec`` from a cgroup v2 ``cpu.stat`` (0 when absent)."""
    for line in cpu_stat.splitlines():
        key, _, value = line.partition(" ")
        if key == "throttled_usec":
            return int(value)
    return 0


def contended(before: CpuSample, after: CpuSample, was: bool) -> bool:
    """Whether the CPUs count as saturated after two samples, given whether they did
    before (*was*): entering takes less than ``ENTER_IDLE`` idle, leaving more than
    ``LEAVE_IDLE``."""
    if after.throttled_us > before.throttled_us:
        return True
    busy, idle = after.busy - before.busy, after.idle - before.idle
    total = busy + idle
    if total <= 0:
        return was  # no tick passed: nothing new known
    return idle < (LEAVE_IDLE if was else ENTER_IDLE) * total


class CpuWatch:
    """Samples this process's CPUs; ``update`` says whether they are contended, from
    the time since the previous call (False on the first, and while ``/proc/stat``
    cannot be read)."""

    def __init__(self, proc_stat: Path = PROC_STAT, cgroup: Path = CGROUP_CPU_STAT) -> None:
        self.proc_stat = proc_stat
        self.cgroup = cgroup
        self.cpus = sorted(os.sched_getaffinity(0))
        self._last: CpuSample | None = None
        self.contended = False
        self._roomy = 0  # windows in a row with room, while contended

    def sample(self) -> CpuSample | None:
        try:
            busy, idle = cpu_ticks(self.proc_stat.read_text(), self.cpus)
        except OSError:
            return None
        try:
            throttled = throttled_us(self.cgroup.read_text())
        except OSError:  # no cgroup v2 CPU controller here: only the CPUs' idle time
            throttled = 0
        return CpuSample(busy, idle, throttled)

    def update(self) -> bool:
        now = self.sample()
        last, self._last = self._last, now
        if now is None:  # unreadable: nothing known, so not contended
            self.contended, self._roomy = False, 0
            return False
        busy = last is not None and contended(last, now, self.contended)
        if busy or not self.contended:
            self.contended, self._roomy = busy, 0
        else:
            self._roomy += 1
            self.contended = self._roomy < LEAVE_SAMPLES
        return self.contended
