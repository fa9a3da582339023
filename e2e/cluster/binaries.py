"""Locations of the harness's caches and the build of its binaries (``build.sh``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from util import HarnessError, LogFn, ToolchainMissingError, _stderr_log

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"


def cache_root() -> Path:
    """Root of backdial's caches: ``$BACKDIAL_CACHE_DIR`` or ``~/.cache/backdial``."""
    explicit = os.environ.get("BACKDIAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "backdial"


def default_state_dir() -> Path:
    """State directory of ``cluster up``: ``$BACKDIAL_CLUSTER_DIR`` or the cache's."""
    explicit = os.environ.get("BACKDIAL_CLUSTER_DIR")
    return Path(explicit).expanduser() if explicit else cache_root() / "cluster-state"


def find_go() -> str | None:
    """Path of the Go toolchain: ``$GO``, ``go`` on PATH, or ``/usr/local/go/bin/go``."""
    candidates = [os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_prerequisites() -> list[str]:
    """Human-readable list of missing tools; empty when the harness can run."""
    missing: list[str] = []
    if find_go() is None:
        missing.append("Go toolchain (go on PATH, $GO or /usr/local/go/bin/go)")
    if shutil.which("openssl") is None:
        missing.append("openssl CLI (apt-get install openssl)")
    if shutil.which("bash") is None:
        missing.append("bash")
    return missing


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control-plane and client binaries."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path

    @classmethod
    def from_tools(cls, tools: Mapping[str, str]) -> Binaries:
        """Build from a ``{"kube-apiserver": "/path", ...}`` mapping (build.sh's output)."""
        try:
            return cls(**{name.replace("-", "_"): Path(tools[name]) for name in TOOL_NAMES})
        except KeyError as exc:
            raise HarnessError(f"build.sh did not report a path for {exc.args[0]}") from exc

    def as_tools(self) -> dict[str, str]:
        """Inverse of :meth:`from_tools`."""
        return {name: str(getattr(self, name.replace("-", "_"))) for name in TOOL_NAMES}


TOOL_NAMES: tuple[str, ...] = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)


def build(
    *, print_only: bool = False, timeout: float = 3600.0, log: LogFn = _stderr_log
) -> Binaries:
    """Build (or find in the cache) every binary by running ``build.sh``.

    ``build.sh`` writes its progress and timings to stderr (passed through) and one
    ``tool=/path`` line per binary to stdout. With ``print_only`` nothing is built and a missing
    binary is an error. Raises :class:`ToolchainMissingError` without a Go toolchain.
    """
    go = find_go()
    if go is None:
        raise ToolchainMissingError(
            "no Go toolchain found (go on PATH, $GO or /usr/local/go/bin/go)"
        )
    bash = shutil.which("bash")
    if bash is None:
        raise ToolchainMissingError("bash is required to run build.sh")
    env = dict(os.environ, GO=go)
    args = [bash, str(BUILD_SCRIPT)] + (["--print-only"] if print_only else [])
    started = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"build.sh did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise HarnessError(f"build.sh failed with exit code {proc.returncode} (see stderr)")
    tools: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, sep, path = line.partition("=")
        if sep:
            tools[name.strip()] = path.strip()
    log(f"binaries ready in {time.monotonic() - started:.1f}s")
    return Binaries.from_tools(tools)
