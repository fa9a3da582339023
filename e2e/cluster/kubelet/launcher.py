"""Container launcher: the first process inside a container's namespaces.

The kubelet runs, for every container start::

    unshare --mount --propagation private --pid --fork --kill-child --mount-proc --uts \\
        <python> launcher.py SPEC.json

so this script is PID 1 of a fresh PID namespace, in a private mount namespace and UTS
namespace. It sets the hostname to the pod name, bind-mounts every volume directory (and the
pod's ``/etc/hosts``) at its mount path, then forks the container's command in a session of
its own and stays as its init: it forwards termination signals to the command, reaps
orphans, and exits with the command's status (128+N when killed by signal N). When it exits
— or is killed, or ``unshare`` is — the kernel kills everything left in the PID namespace,
so no process of a container outlives it.

Standard library only: it runs as a script, not as part of the ``kubelet`` package.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
from typing import Any

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind ``source`` at ``target``, creating the mount point if it is missing."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        with open(target, "a"):
            pass
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount("none", target, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def prepare(spec: dict[str, Any]) -> None:
    """Hostname, mounts and working directory."""
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])
    for mount in spec.get("mounts", []):
        bind(mount["source"], mount["target"], bool(mount.get("read_only")))
    workdir = spec.get("cwd") or "/"
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)


def run(spec: dict[str, Any]) -> int:
    """Fork the command, act as its init, return its exit status."""
    argv: list[str] = spec["argv"]
    env: dict[str, str] = spec["env"]
    child = [0]
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not child[0]:  # before the fork returned: deliver right after
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child[0], signum)

    # Installed before the fork: PID 1 ignores signals it has no handler for.
    for sig in FORWARDED:
        signal.signal(sig, forward)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            print(f"backdial-kubelet: cannot run {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    child[0] = pid
    for signum in pending:
        forward(signum, None)
    while True:
        try:
            reaped, status = os.wait()
        except ChildProcessError:  # pragma: no cover - the command is always our child
            return 0
        if reaped == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.waitstatus_to_exitcode(status)


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    try:
        prepare(spec)
    except OSError as exc:
        print(f"backdial-kubelet: container setup failed: {exc}", file=sys.stderr, flush=True)
        return 126
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
