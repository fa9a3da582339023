"""``backdial up``: acceptor + sidecar + demo service as local processes.

The three run exactly as they would in a pod (separate processes sharing a
run directory), so what works here works there.  Ctrl-C (or SIGTERM) stops
them in reverse order: the sidecar drains first, then the service, then the
acceptor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from backdial.options import integer, load, option, optional_path
from backdial.runtime import ConfigError, fail
from backdial.sdk.config import app_spec


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "backdial.cli", *args]


def _wait_http(url: str, timeout: float, procs: list[subprocess.Popen[bytes]]) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@dataclass(frozen=True, slots=True)
class UpSettings:
    port: int = option(
        "--port", parse=integer(1, 65534), default="8080", help="client port of the sidecar"
    )
    admin_port: int = option(
        "--admin-port",
        parse=integer(1, 65534),
        default="9901",
        help="acceptor admin port; the sidecar's admin is the next port",
    )
    sessions: int = option(
        "--sessions",
        parse=integer(1, 10_000),
        default="16",
        help="sessions the demo service registers",
    )
    workers: int = option(
        "--workers", parse=integer(1, 64), default="1", help="sidecar worker processes"
    )
    host: str = option("--host", default="127.0.0.1", help="address to listen on")
    config: Path | None = option(
        "--config", parse=optional_path, help="acceptor config file (slices, routes, limits)"
    )
    run_dir: Path | None = option(
        "--run-dir",
        parse=optional_path,
        env="UP_RUN_DIR",
        help="run directory (default: a new temporary directory)",
    )
    app: str = option(
        "--app", parse=app_spec, default="backdial.demo:app", help="ASGI app to serve"
    )


def main(argv: list[str]) -> int:
    try:
        ns = load(
            UpSettings,
            argv,
            prog="backdial up",
            description="Run acceptor, sidecar and the demo service locally; Ctrl-C stops "
            "them. Every option may also be given as the BACKDIAL_* variable named in its "
            "help; a flag wins.",
        )
    except ConfigError as exc:
        return fail(str(exc))
    run_dir = Path(ns.run_dir or tempfile.mkdtemp(prefix="backdial-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    acceptor_admin = f"{ns.host}:{ns.admin_port}"
    sidecar_admin = f"{ns.host}:{ns.admin_port + 1}"
    acceptor = _cmd("acceptor", "--run-dir", str(run_dir), "--admin", acceptor_admin)
    if ns.config:
        acceptor += ["--config", str(ns.config)]
    sidecar = _cmd(
        "sidecar",
        "--run-dir",
        str(run_dir),
        "--listen",
        f"{ns.host}:{ns.port}",
        "--admin",
        sidecar_admin,
        "--workers",
        str(ns.workers),
    )
    service = _cmd(
        "serve",
        ns.app,
        "--register",
        f"unix://{run_dir}/register.sock",
        "--sessions",
        str(ns.sessions),
        "--service",
        "demo",
    )
    procs: list[subprocess.Popen[bytes]] = []
    stopping: list[int] = []
    # Ctrl-C goes to the whole foreground process group; each child starts its own
    # session, so only this process sees it and stops them in order.
    signal.signal(signal.SIGINT, lambda sig, _: stopping.append(sig))
    signal.signal(signal.SIGTERM, lambda sig, _: stopping.append(sig))
    try:
        procs.append(subprocess.Popen(acceptor, start_new_session=True))
        if not _wait_http(f"http://{acceptor_admin}/healthz", 15, procs):
            return fail("acceptor did not start (see its log above)")
        procs.append(subprocess.Popen(service, start_new_session=True))
        procs.append(subprocess.Popen(sidecar, start_new_session=True))
        if not _wait_http(f"http://{sidecar_admin}/readyz", 20, procs):
            return fail("sidecar did not become ready (see the logs above)")
        with urllib.request.urlopen(f"http://{acceptor_admin}/v1/state", timeout=5) as resp:
            registered = sum(s["registered"] for s in json.load(resp)["services"].values())
        print(
            f"\nbackdial is up ({registered} sessions registered, run dir {run_dir})\n"
            f"  proxy           http://{ns.host}:{ns.port}/\n"
            f"  acceptor admin  http://{acceptor_admin}/v1/state  /metrics\n"
            f"  sidecar admin   http://{sidecar_admin}/metrics  /readyz\n"
            f"  try: curl http://{ns.host}:{ns.port}/  |  curl http://{ns.host}:{ns.port}/stats\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping and _all_alive(procs):
            time.sleep(0.2)
        if not stopping:
            return fail("a component exited unexpectedly; stopping the others")
        return 0
    finally:
        _stop(procs)


def _all_alive(procs: list[subprocess.Popen[bytes]]) -> bool:
    return all(p.poll() is None for p in procs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # Reverse order: sidecar drains, then the service retires its sessions, then the acceptor.
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if os.environ.get("BACKDIAL_UP_QUIET") is None:
        print("backdial: stopped", file=sys.stderr)
