"""Control-plane processes: start in their own process group (killed with the parent if
asked), liveness that survives pid reuse, staged stop, and reading the tail of their logs."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":  # zombie: as good as gone
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when its parent dies.

    SIGKILL rather than SIGTERM: all components would get the signal at once, and a
    kube-apiserver whose etcd is gone hangs in its graceful shutdown.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


@dataclass
class Process:
    """One control-plane process, in its own process group (its pid is the pgid)."""

    name: str
    argv: list[str]
    log: str
    pid: int = 0
    start_time: int = 0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def start(self, *, cwd: Path, env: Mapping[str, str], die_with_parent: bool) -> None:
        """Spawn the process, output appended to its log file."""
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only prctl() runs between fork and exec; harmless with threads.
                preexec_fn=_pdeathsig_preexec() if die_with_parent else None,
            )
        self.pid = self.popen.pid
        self.start_time = _proc_start_time(self.pid) or 0

    def alive(self) -> bool:
        """Whether this very process (same pid and start time) still runs."""
        if self.pid <= 0:
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        started = _proc_start_time(self.pid)
        return started is not None and self.start_time in (0, started)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group, if the process is still ours and alive."""
        if not self.alive():
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - not our process group
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for exit; True if it is gone."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable description (without the Popen handle)."""
        return {
            "name": self.name,
            "argv": list(self.argv),
            "log": self.log,
            "pid": self.pid,
            "start_time": self.start_time,
        }


def stop_processes(groups: Sequence[Sequence[Process]], grace: float = 10.0) -> None:
    """Stop processes stage by stage: SIGTERM, wait ``grace`` seconds, then SIGKILL.

    Signals go to each process group only while its leader is verifiably the process that
    was started (pid and start time), so a recycled pid is never signalled.
    """
    for group in groups:
        for proc in group:
            proc.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in group:
            if not proc.wait(max(0.0, deadline - time.monotonic())):
                proc.signal_group(signal.SIGKILL)
                proc.wait(5.0)


def processes_matching(text: str) -> list[int]:
    """Pids of the host's processes whose command line contains ``text`` (for tests that
    prove a container left nothing behind)."""
    found: list[int] = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found
