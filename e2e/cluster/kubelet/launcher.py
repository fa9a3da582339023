"""Container launcher: the first process inside a container's namespaces.

The kubelet runs, for every container start::

    unshare --mount --propagation private --pid --fork --kill-child --mount-proc --uts \\
        <python> launcher.py SPEC.json

so this script is PID 1 of a fresh PID namespace, in a private mount namespace and UTS
namespace. It sets the hostname to the pod name, bind-mounts every volume directory (and the
pod's ``/etc/hosts``) at its mount path (:class:`Mounts`: nothing is written to the host
outside the pod's directories; a setup failure is written to the spec's ``error_file``
and ends the launcher with status 126), then forks the container's command in a session of
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
import stat
import sys
from typing import Any

SETUP_FAILED = 126  # exit status when the container could not be set up
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """The container cannot be set up; the kubelet shows it as ``CreateContainerError``."""


def _mount(source: str, target: str, flags: int, fstype: str = "", data: str = "") -> None:
    if (
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() or None,
            flags,
            data.encode() or None,
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _bind(source: str, target: str, read_only: bool = False) -> None:
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount("none", target, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class Mounts:
    """Bind mounts without writing to the host outside the pod's own directories.

    Every source is opened (``O_PATH``) before anything is mounted, so a volume mounted
    over a directory that holds another volume's source (an emptyDir at ``/tmp`` over the
    pod directory under the host's ``/tmp``) cannot hide it; a source that is missing
    fails the container before anything is created. A mount point that does not exist is
    made in a *layer*: the deepest existing directory is covered with a tmpfs holding a
    bind of each of its entries (or, for a top-level directory, the container gets a
    tmpfs root built the same way, entered with ``chroot``), so the new directory exists
    only in this container's mount namespace. Inside a volume mounted earlier (pod-owned,
    or a hostPath), mount points are made in the volume, as Kubernetes does.
    """

    def __init__(self, scratch: str) -> None:
        self.scratch = scratch  # an empty pod-owned directory: the tmpfs root, if needed
        self.layers: set[int] = set()  # st_dev of the tmpfs layers made here
        self.volumes: list[str] = []  # real paths of the mounts made so far

    @staticmethod
    def open_source(source: str) -> int:
        try:
            return os.open(source, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SetupError(f"mount source {source} does not exist") from None

    def need_root_layer(self, paths: list[str]) -> list[str]:
        """Top-level directories *paths* need that the host does not have."""
        tops = []
        for path in paths:
            parts = os.path.normpath(path).split("/")
            if len(parts) < 2 or not parts[1]:
                raise SetupError(f"cannot mount over {path!r}")
            if not os.path.lexists("/" + parts[1]):
                tops.append(parts[1])
        return sorted(set(tops))

    def enter_root_layer(self, tops: list[str]) -> None:
        """A tmpfs root with binds of every entry of ``/``, plus *tops*; then chroot."""
        root = self.scratch
        _mount("tmpfs", root, MS_NOSUID | MS_NODEV, "tmpfs", "mode=755")
        _mount("none", root, MS_UNBINDABLE)  # the binds of "/" below leave it out
        self._replicate("/", root)
        for top in tops:
            os.mkdir(os.path.join(root, top), 0o755)
        self.layers.add(os.stat(root).st_dev)
        os.chdir(root)
        os.chroot(".")
        os.chdir("/")

    def _replicate(self, source: str, target: str) -> None:
        """Each entry of directory *source* appears in *target* (binds, symlinks copied)."""
        for name in os.listdir(source):
            src, dst = os.path.join(source, name), os.path.join(target, name)
            try:
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(dst, st.st_mode & 0o7777)
                else:
                    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                _bind(src, dst)
            except FileNotFoundError:  # gone meanwhile (a shared /tmp)
                with contextlib.suppress(OSError):
                    os.rmdir(dst) if os.path.isdir(dst) else os.unlink(dst)

    def _layer(self, directory: str) -> None:
        """Cover host *directory* with a tmpfs that shows the same entries."""
        st = os.stat(directory)
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mode = f"mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}"
            _mount("tmpfs", directory, MS_NOSUID | MS_NODEV, "tmpfs", mode)
            self._replicate(f"/proc/self/fd/{fd}", directory)  # the covered directory
        finally:
            os.close(fd)
        self.layers.add(os.stat(directory).st_dev)

    def ensure(self, path: str, directory: bool) -> None:
        """*path* exists as a directory (or a file) to mount on."""
        path = os.path.normpath(path)
        if os.path.exists(path):
            if os.path.isdir(path) != directory:
                what = "is not a directory" if directory else "is a directory"
                raise SetupError(f"mount path {path} {what}")
            return
        parent = path
        while not os.path.exists(parent):
            if os.path.lexists(parent):
                raise SetupError(f"mount path {path}: {parent} is a dangling symlink")
            parent = os.path.dirname(parent)
        real = os.path.realpath(parent)
        if os.stat(real).st_dev not in self.layers and not _under(real, self.volumes):
            self._layer(real)
        made = os.path.join(real, os.path.relpath(path, parent))
        if directory:
            os.makedirs(made, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(made), exist_ok=True)
            os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))

    def bind(self, fd: int, target: str, read_only: bool) -> None:
        self.ensure(target, stat.S_ISDIR(os.fstat(fd).st_mode))
        _bind(f"/proc/self/fd/{fd}", target, read_only)
        self.volumes.append(os.path.realpath(target))


def prepare(spec: dict[str, Any]) -> None:
    """Hostname, mounts and working directory; :class:`SetupError` when impossible."""
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])
    mounts = spec.get("mounts", [])
    workdir = spec.get("cwd") or "/"
    fds = [Mounts.open_source(m["source"]) for m in mounts]
    layered = Mounts(spec.get("scratch") or "")
    paths = [m["target"] for m in mounts] + ([workdir] if workdir != "/" else [])
    tops = layered.need_root_layer(paths)
    if tops:
        if not layered.scratch:
            raise SetupError(f"no scratch directory for the new top-level paths {tops}")
        layered.enter_root_layer(tops)
    for mount, fd in zip(mounts, fds, strict=True):
        layered.bind(fd, mount["target"], bool(mount.get("read_only")))
        os.close(fd)
    if workdir != "/":
        layered.ensure(workdir, directory=True)
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
    # Opened before anything is mounted (a mount could hide its path): the kubelet reads
    # why the setup failed from it.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    report = os.open(spec["error_file"], flags, 0o600)
    try:
        prepare(spec)
    except (OSError, SetupError) as exc:
        print(f"backdial-kubelet: container setup failed: {exc}", file=sys.stderr, flush=True)
        os.write(report, str(exc).encode())
        return SETUP_FAILED
    finally:
        os.close(report)
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
