"""One run of one container: ``unshare`` + ``launcher.py`` + the command.

The process tree is ``unshare`` (in its own process group, SIGKILLed by the kernel if the
kubelet dies) → ``launcher.py`` (PID 1 of the container's PID namespace; killed with
``unshare``) → the command. Signals for the container go to the process group of
``unshare``: ``unshare`` itself blocks SIGTERM/SIGINT while it waits, the launcher forwards
them to the command. SIGKILL ends the launcher and with it the whole PID namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
UNSHARE_FLAGS = (
    "--mount",
    "--propagation",
    "private",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
    "--uts",
)
_PR_SET_PDEATHSIG = 1
_ids = itertools.count(1)


def _die_with_parent() -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


@dataclass(frozen=True)
class BindMount:
    """A host path bound at ``target`` inside the container."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the launcher needs for one container run."""

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    hostname: str
    mounts: Sequence[BindMount]

    def to_json(self, scratch: str = "", error_file: str = "") -> str:
        return json.dumps(
            {
                "scratch": scratch,
                "error_file": error_file,
                "argv": list(self.argv),
                "env": dict(self.env),
                "cwd": self.cwd,
                "hostname": self.hostname,
                "mounts": [
                    {"source": m.source, "target": m.target, "read_only": m.read_only}
                    for m in self.mounts
                ],
            }
        )


def setup_paths(spec_file: Path) -> tuple[Path, Path]:
    """(scratch directory, error file) of the launcher that runs ``spec_file``."""
    return spec_file.with_suffix(".root"), spec_file.with_suffix(".error")


def _prepare(spec: LaunchSpec, spec_file: Path, log_file: Path) -> BinaryIO:
    """Write the launcher's spec (private: it holds the environment); open the log."""
    scratch, error_file = setup_paths(spec_file)
    scratch.mkdir(parents=True, exist_ok=True)
    error_file.unlink(missing_ok=True)
    spec_file.write_text(spec.to_json(str(scratch), str(error_file)))
    spec_file.chmod(0o600)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    return open(log_file, "ab")


def missing_tools() -> list[str]:
    """Host tools the process node needs that are not installed."""
    return [t for t in ("unshare", "nsenter") if shutil.which(t) is None]


class ContainerProcess:
    """One started container run."""

    def __init__(
        self, proc: asyncio.subprocess.Process, container_id: str, spec_file: Path
    ) -> None:
        self._proc = proc
        self.container_id = container_id
        self.pid = proc.pid
        self._error_file = setup_paths(spec_file)[1]

    @classmethod
    async def start(
        cls, spec: LaunchSpec, spec_file: Path, log_file: Path, python: str = sys.executable
    ) -> ContainerProcess:
        """Write the spec and start the container; output is appended to ``log_file``."""
        with _prepare(spec, spec_file, log_file) as log:
            proc = await asyncio.create_subprocess_exec(
                "unshare",
                *UNSHARE_FLAGS,
                python,
                str(LAUNCHER),
                str(spec_file),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        return cls(proc, f"backdial-proc://{os.getpid()}-{next(_ids)}", spec_file)

    @property
    def exited(self) -> bool:
        return self._proc.returncode is not None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the container (see the module docstring)."""
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def wait(self) -> tuple[int, int]:
        """Wait for the run to end: (exit code as Kubernetes shows it, signal or 0)."""
        code = await self._proc.wait()
        if code < 0:  # unshare itself was killed (SIGKILL after the grace period)
            return 128 - code, -code
        return code, code - 128 if code > 128 else 0

    def setup_error(self) -> str:
        """Why the launcher could not set the container up ("" if it did, or still runs)."""
        if not self.exited:
            return ""
        try:
            return self._error_file.read_text(errors="replace").strip()
        except OSError:
            return ""

    def init_pid(self) -> int | None:
        """Host pid of the launcher (PID 1 inside), to enter the container's namespaces."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        with contextlib.suppress(OSError):
            children = path.read_text().split()
            if children:
                return int(children[0])
        return None

    def exec_argv(self, command: Sequence[str]) -> list[str]:
        """``command`` wrapped to run inside the container's mount and UTS namespaces."""
        pid = self.init_pid()
        if pid is None:
            raise ProcessLookupError("container is not running")
        # --root and --wd: the container may have a root of its own (launcher.Mounts).
        return ["nsenter", f"--target={pid}", "--mount", "--uts", "--root", "--wd", "--", *command]
