"""Shared machinery for the benchmarks: processes, proxies, wrk, /proc accounting.

Stdlib only.  Everything listens on 127.0.0.1 on ports picked at start, every
process is started in its own process group and stopped by ``Stack.stop`` (the
callers use ``try/finally``), and every run is bounded by a duration.

Nothing here is specific to one scenario: ``run.py`` (throughput, CPU, context
switches, TIME_WAIT) and ``slow_clients.py`` both build on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WRK = shutil.which("wrk") or "/usr/bin/wrk"


class BenchError(RuntimeError):
    """A setup step failed (a process did not start, a tool is missing)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def backdial_cmd(*args: str) -> list[str]:
    """The ``backdial`` console script, or ``python -m backdial.cli`` without it."""
    exe = shutil.which("backdial")
    if exe:
        return [exe, *args]
    return [sys.executable, "-m", "backdial.cli", *args]


APT_TOOLS = {
    "wrk": "wrk",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "taskset": "util-linux",
    "ss": "iproute2",
}


def require_tools(names: Iterable[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None and not Path(n).exists()]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (apt-get install -y wrk nginx haproxy)"
        )


def ensure_tools(install: bool = True, plots: bool = True) -> None:
    """Install the peers (Debian's wrk, nginx, haproxy) and matplotlib when missing.

    apt-get needs root; pip installs matplotlib into the interpreter running the bench.
    """
    global WRK
    missing = sorted({pkg for tool, pkg in APT_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        if not install or os.geteuid() != 0:
            raise BenchError(
                f"missing: {', '.join(missing)} (apt-get install -y {' '.join(missing)})"
            )
        log(f"installing {', '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
        WRK = shutil.which("wrk") or WRK
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if not install:
                raise BenchError("matplotlib missing (pip install matplotlib)") from None
            log("installing matplotlib with pip")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.6"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise BenchError(f"pip install matplotlib failed:\n{proc.stderr[-2000:]}") from None


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's (and so its children's) open-file limit; returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kib(pids: Iterable[int]) -> int:
    """Resident set size (VmRSS) summed over *pids*, in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class IdleLimits:
    """A peer configured for the idle-connection measurement (``idle.py``): room for
    *max_conns* client connections, idle/header timeouts of *timeout_s* (longer than the
    measurement), and a status endpoint on *status_port* where the peer needs one."""

    max_conns: int
    timeout_s: int
    status_port: int = 0


@dataclass
class Proc:
    """One started process (and its descendants), in its own process group."""

    name: str
    argv: list[str]
    log_path: Path
    cpus: str | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = list(self.argv)
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        env = dict(os.environ)
        env.update(self.env or {})
        logf = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=str(REPO_DIR),
            )
        finally:
            logf.close()

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} not started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and every descendant (nginx workers, sidecar workers)."""
        if not self.alive():
            return []
        return [self.pid, *descendants(self.pid)]

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # start_new_session: the pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        # Anything left in the group (a worker that outlived its master) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    children = _children_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass(frozen=True)
class Usage:
    """CPU seconds and context switches of a set of processes (all their threads)."""

    cpu: float
    vcsw: int
    ivcsw: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.vcsw - other.vcsw, self.ivcsw - other.ivcsw)

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.cpu + other.cpu, self.vcsw + other.vcsw, self.ivcsw + other.ivcsw)

    @property
    def csw(self) -> int:
        return self.vcsw + self.ivcsw


ZERO = Usage(0.0, 0, 0)


def usage_of(pid: int) -> Usage:
    """utime+stime of the whole process; context switches summed over its threads."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    vcsw = ivcsw = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vcsw += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                ivcsw += int(line.split()[1])
    return Usage(cpu, vcsw, ivcsw)


def usage_many(pids: Iterable[int]) -> dict[int, Usage]:
    out: dict[int, Usage] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = usage_of(pid)
    return out


CPU_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def system_cpu() -> dict[str, dict[str, float]]:
    """CPU seconds since boot by /proc/stat column, machine-wide ("all") and per CPU.

    Each entry also has "busy" (everything but idle and iowait) and "irq_total"
    (irq + softirq: on loopback, mostly the network stack's receive path).
    """
    out: dict[str, dict[str, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            parts = line.split()
            cols = {
                name: int(v) / CLK_TCK for name, v in zip(CPU_COLUMNS, parts[1:9], strict=False)
            }
            cols["busy"] = sum(cols.values()) - cols["idle"] - cols["iowait"]
            cols["irq_total"] = cols["irq"] + cols["softirq"]
            out[parts[0][3:] or "all"] = cols
    return out


def wait_quiet(max_wait: float, threshold_pct: float, window: float = 1.0) -> float:
    """Wait (at most ``max_wait`` s) for a ``window`` in which the whole machine is busy
    less than ``threshold_pct`` % of one core, outside irq time.  Between measurements the
    servers idle, so what is busy then is someone else.  Returns the seconds waited."""
    start = time.monotonic()
    while True:
        before = system_cpu()["all"]
        time.sleep(window)
        after = system_cpu()["all"]
        busy = (after["busy"] - after["irq_total"]) - (before["busy"] - before["irq_total"])
        waited = time.monotonic() - start
        if busy / window * 100 <= threshold_pct or waited >= max_wait:
            return waited


def cpu_delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        cpu: {k: round(v - before[cpu][k], 3) for k, v in cols.items()}
        for cpu, cols in after.items()
    }


def wait_http(url: str, timeout: float, procs: Sequence[Proc], want: int = 200) -> None:
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        for p in procs:
            if not p.alive():
                raise BenchError(f"{p.name} exited while starting:\n{p.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == want:
                    return
                last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in procs)
    raise BenchError(f"{url} not ready after {timeout}s ({last})\n{tails}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------- stacks


@dataclass
class Stack:
    """One thing wrk talks to: a proxy (its processes) in front of a backend."""

    name: str
    port: int
    upstream_port: int | None  # TCP port the proxy dials, for TIME_WAIT attribution
    proxy: list[Proc] = field(default_factory=list)
    backend: list[Proc] = field(default_factory=list)
    owned: list[Proc] = field(default_factory=list)  # processes this stack must stop
    note: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def url_for(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def proxy_pids(self) -> list[int]:
        return [pid for p in self.proxy for pid in p.pids()]

    def backend_pids(self) -> list[int]:
        return [pid for p in self.backend for pid in p.pids()]

    def check_alive(self) -> None:
        for p in [*self.proxy, *self.backend]:
            if not p.alive():
                raise BenchError(f"{self.name}: {p.name} died:\n{p.tail()}")

    def stop(self) -> None:
        for p in reversed(self.owned):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {p.name}: {exc}")


class Workspace:
    """A temp dir for configs and logs; removed at the end unless ``keep``."""

    def __init__(self, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="backdial-bench-"))
        self.dir.chmod(0o755)
        self.keep = keep
        self.stacks: list[Stack] = []

    def path(self, name: str) -> Path:
        return self.dir / name

    def stop_all(self) -> None:
        for stack in reversed(self.stacks):
            stack.stop()
        self.stacks.clear()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_backend(ws: Workspace, cpus: str | None) -> Stack:
    """The demo app served conventionally: the backend every peer proxy dials."""
    port = free_port()
    proc = Proc(
        "backend",
        backdial_cmd(
            "serve", "backdial.demo:app", "--listen", f"{HOST}:{port}", "--log-level", "warning"
        ),
        ws.path("backend.log"),
        cpus,
    )
    stack = Stack(
        "direct",
        port,
        None,
        proxy=[],
        backend=[proc],
        owned=[proc],
        note="wrk straight to the backend, no proxy (ceiling, not a peer)",
    )
    ws.stacks.append(stack)
    proc.start()
    wait_http(f"http://{HOST}:{port}/", 20, [proc])
    return stack


def _nginx_conf(
    ws: Workspace,
    name: str,
    port: int,
    backend: int,
    keepalive: bool,
    idle: IdleLimits | None = None,
) -> Path:
    base = ws.path(name + ("-idle" if idle else ""))
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    if keepalive:
        upstream = (
            f"    upstream app {{\n        server {HOST}:{backend};\n"
            "        keepalive 64;\n        keepalive_requests 1000000;\n    }\n"
        )
        location = (
            "            proxy_pass http://app;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
        )
    else:
        upstream = ""
        # nginx's defaults: HTTP/1.0 upstream, "Connection: close", one connect() per request.
        location = f"            proxy_pass http://{HOST}:{backend};\n"
    idle_http = ""
    if idle:  # longer header timeout; stub_status: the accepted connections idle.py checks
        idle_http = (
            f"    client_header_timeout {idle.timeout_s}s;\n"
            f"    server {{\n        listen {HOST}:{idle.status_port};\n"
            "        location / {\n            stub_status;\n        }\n    }\n"
        )
    text = (
        f"{user}worker_processes 1;\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {base}/nginx.pid;\n"
        f"error_log {base}/error.log warn;\n"
        f"events {{\n    worker_connections {idle.max_conns if idle else 8192};\n}}\n"
        "http {\n"
        "    access_log off;\n"
        f"{idle_http}"
        "    keepalive_requests 1000000;\n"
        "    keepalive_timeout 75s;\n"
        f"    client_body_temp_path {base}/client_body;\n"
        f"    proxy_temp_path {base}/proxy;\n"
        f"    fastcgi_temp_path {base}/fastcgi;\n"
        f"    uwsgi_temp_path {base}/uwsgi;\n"
        f"    scgi_temp_path {base}/scgi;\n"
        f"{upstream}"
        "    server {\n"
        f"        listen {HOST}:{port};\n"
        "        location / {\n"
        f"{location}"
        "        }\n"
        "    }\n"
        "}\n"
    )
    conf = base / "nginx.conf"
    conf.write_text(text)
    return conf


def start_nginx(
    ws: Workspace,
    backend: Stack,
    keepalive: bool,
    cpus: str | None,
    idle: IdleLimits | None = None,
) -> Stack:
    name = "nginx-keepalive" if keepalive else "nginx-dialing"
    port = free_port()
    conf = _nginx_conf(ws, name, port, backend.port, keepalive, idle)
    proc = Proc(
        name,
        ["nginx", "-p", str(conf.parent), "-e", str(conf.parent / "error.log"), "-c", str(conf)],
        ws.path(f"{conf.parent.name}.log"),
        cpus,
    )
    note = (
        "upstream keepalive 64, HTTP/1.1"
        if keepalive
        else "one connect() per request (HTTP/1.0, Connection: close)"
    )
    stack = Stack(
        name, port, backend.port, proxy=[proc], backend=backend.backend, owned=[proc], note=note
    )
    if idle:
        stack.extra["nginx_status"] = f"http://{HOST}:{idle.status_port}/"
    ws.stacks.append(stack)
    proc.start()
    wait_http(stack.url, 15, [proc, *backend.backend])
    return stack


def start_haproxy(
    ws: Workspace, backend: Stack, cpus: str | None, idle: IdleLimits | None = None
) -> Stack:
    port = free_port()
    base = ws.path("haproxy-idle" if idle else "haproxy")
    base.mkdir(exist_ok=True)
    conf = base / "haproxy.cfg"
    stats = base / "stats.sock"
    conf.write_text(
        "global\n"
        "    nbthread 1\n"
        f"    maxconn {idle.max_conns if idle else 4000}\n"
        # the accepted-connection count the idle measurement checks (show info: CurrConns)
        + (f"    stats socket {stats}\n" if idle else "")
        + "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        f"    timeout client {idle.timeout_s if idle else 60}s\n"
        "    timeout server 60s\n"
        "    timeout http-keep-alive 75s\n"
        "    http-reuse always\n"
        "frontend bench\n"
        f"    bind {HOST}:{port}\n"
        "    default_backend app\n"
        "backend app\n"
        f"    server app1 {HOST}:{backend.port}\n"
    )
    proc = Proc("haproxy", ["haproxy", "-db", "-f", str(conf)], ws.path(f"{base.name}.log"), cpus)
    stack = Stack(
        "haproxy",
        port,
        backend.port,
        proxy=[proc],
        backend=backend.backend,
        owned=[proc],
        note="mode http, http-reuse always, nbthread 1",
    )
    if idle:
        stack.extra["haproxy_stats"] = str(stats)
    ws.stacks.append(stack)
    proc.start()
    wait_http(stack.url, 15, [proc, *backend.backend])
    return stack


def start_backdial(
    ws: Workspace,
    cpus: str | None,
    sessions: int = 16,
    workers: int = 1,
    sidecar_prefix: Sequence[str] = (),
    sidecar_args: Sequence[str] = (),
    name: str = "backdial",
    config: Path | None = None,
    ready_timeout: float = 30.0,
) -> Stack:
    """Acceptor + sidecar + demo service: the three commands ``backdial up`` runs."""
    run_dir = ws.path(f"{name}-run")
    run_dir.mkdir(exist_ok=True)
    port, acc_admin, side_admin = free_port(), free_port(), free_port()
    acceptor = Proc(
        "acceptor",
        backdial_cmd(
            "acceptor",
            "--run-dir",
            str(run_dir),
            "--admin",
            f"{HOST}:{acc_admin}",
            "--log-level",
            "warning",
            *(["--config", str(config)] if config is not None else []),
        ),
        ws.path(f"{name}-acceptor.log"),
        cpus,
    )
    service = Proc(
        "service",
        backdial_cmd(
            "serve",
            "backdial.demo:app",
            "--register",
            f"unix://{run_dir}/register.sock",
            "--sessions",
            str(sessions),
            "--service",
            "demo",
            "--log-level",
            "warning",
        ),
        ws.path(f"{name}-service.log"),
        cpus,
    )
    sidecar_cmd = backdial_cmd(
        "sidecar",
        "--run-dir",
        str(run_dir),
        "--listen",
        f"{HOST}:{port}",
        "--admin",
        f"{HOST}:{side_admin}",
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        *sidecar_args,
    )
    if sidecar_prefix:
        # e.g. python -m cProfile -o out.prof -m backdial.cli sidecar ...
        sidecar_cmd = [*sidecar_prefix, *sidecar_cmd[sidecar_cmd.index("sidecar") :]]
    sidecar = Proc("sidecar", sidecar_cmd, ws.path(f"{name}-sidecar.log"), cpus)
    stack = Stack(
        name,
        port,
        None,
        proxy=[sidecar, acceptor],
        backend=[service],
        owned=[acceptor, service, sidecar],
        note=f"acceptor + sidecar ({workers} worker) + {sessions} sessions over UNIX",
    )
    stack.extra = {
        "run_dir": str(run_dir),
        "acceptor_admin": f"http://{HOST}:{acc_admin}",
        "sidecar_admin": f"http://{HOST}:{side_admin}",
    }
    ws.stacks.append(stack)
    acceptor.start()
    wait_http(f"http://{HOST}:{acc_admin}/healthz", 20, [acceptor])
    service.start()
    sidecar.start()
    wait_http(f"http://{HOST}:{side_admin}/readyz", ready_timeout, [acceptor, service, sidecar])
    wait_http(stack.url, 15, [acceptor, service, sidecar])
    return stack


# ---------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    avg_ms: float
    max_ms: float
    socket_errors: dict[str, int]
    non2xx: int
    raw: str
    bytes_per_s: float = 0.0

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "avg_ms": self.avg_ms,
            "max_ms": self.max_ms,
            "socket_errors": self.socket_errors,
            "non2xx": self.non2xx,
            "errors": self.errors,
            "bytes_per_s": self.bytes_per_s,
        }


_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.M)
        if not m:
            raise BenchError(f"cannot parse wrk output ({pattern!r}):\n{out}")
        return m

    lat = grab(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)")
    done = grab(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m)")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1e3,
        rps=float(grab(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(grab(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(grab(r"^\s+99%\s+(\S+)").group(1)),
        avg_ms=_ms(lat.group(1)),
        max_ms=_ms(lat.group(3)),
        socket_errors=(
            dict(
                zip(
                    ("connect", "read", "write", "timeout"),
                    (int(g) for g in sock.groups()),
                    strict=True,
                )
            )
            if sock
            else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
        ),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        raw=out,
        bytes_per_s=_transfer(out),
    )


def _transfer(out: str) -> float:
    m = re.search(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)", out, re.M)
    return float(m.group(1)) * _BYTES[m.group(2)] if m else 0.0


def wrk(
    url: str,
    conns: int,
    seconds: float,
    threads: int,
    cpus: str | None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """One wrk run; *headers* like ``"Connection: close"`` (a new connection per request)."""
    argv = [
        WRK,
        f"-t{min(threads, conns)}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {argv}") from exc
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return parse_wrk(proc.stdout)


# ---------------------------------------------------------------- TIME_WAIT


def time_wait_sockets() -> set[tuple[str, str]]:
    """(local, peer) of every TCP socket in TIME_WAIT on the machine."""
    out = subprocess.run(
        ["ss", "-Htan", "state", "time-wait"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    socks: set[tuple[str, str]] = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            socks.add((parts[2], parts[3]))
    return socks


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def classify_time_wait(
    new: set[tuple[str, str]], client_port: int, upstream_port: int | None
) -> dict[str, int]:
    """New TIME_WAIT sockets split by the hop they belong to."""
    counts = {"client_side": 0, "upstream_side": 0, "other": 0}
    for local, peer in new:
        ports = {_port(local), _port(peer)}
        if client_port in ports:
            counts["client_side"] += 1
        elif upstream_port is not None and upstream_port in ports:
            counts["upstream_side"] += 1
        else:
            counts["other"] += 1
    return counts


# ---------------------------------------------------------------- stats, versions


def spread(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unavailable"


def environment() -> dict[str, Any]:
    import platform

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "wrk": _first_line([WRK, "-v"]),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
    }
    for mod in ("uvloop", "httptools"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "unavailable"
    try:
        git = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        versions["backdial_commit"] = git.stdout.strip() or "unknown"
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO_DIR),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "src",
                "sidecar",
                "acceptor",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        if dirty:
            versions["backdial_commit"] += " (+ uncommitted changes)"
    except OSError:
        versions["backdial_commit"] = "unknown"
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def control_records(acceptor_admin: str) -> dict[str, float]:
    """``backdial_acceptor_control_records_total`` by type, from the acceptor's /metrics."""
    status, body = http_get(acceptor_admin + "/metrics", timeout=5)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("backdial_acceptor_control_records_total{"):
            series, _, value = line.rpartition(" ")
            m = re.search(r'type="([^"]*)"', series)
            out[m.group(1) if m else series] = float(value)
    return out


def tcp_opens() -> int:
    """Machine-wide TCP connects (ActiveOpens) since boot, from /proc/net/snmp."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index("ActiveOpens")])
