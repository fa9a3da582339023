"""`backdial up` as a user runs it: one command, URLs printed, curl answers, Ctrl-C stops all."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import free_port, free_port_pair, get_json, http_get, wait_for

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    kids = {int(p) for p, pp in (line.split() for line in out.splitlines()) if int(pp) == pid}
    return kids


def test_up_serves_through_leased_sessions_and_stops_cleanly(run_dir) -> None:  # type: ignore[no-untyped-def]
    admin = free_port_pair()
    port = free_port()
    while port in (admin, admin + 1):
        port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backdial.cli",
            "up",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--sessions",
            "3",
            "--run-dir",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    children: list[int] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}/" in text, text
        assert f"http://127.0.0.1:{admin}/v1/state" in text
        children = _children(proc.pid)
        assert len(children) == 3
        status, body, _ = http_get(f"http://127.0.0.1:{port}/")
        assert (status, body) == (200, b"hello from backdial\n")
        state = get_json(f"http://127.0.0.1:{admin}/v1/state")
        assert state["services"]["demo"]["registered"] == 3
        # The request went over a leased session, not a connection the sidecar dialed.
        metrics = http_get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
        prefix = "backdial_acceptor_leases_granted"
        granted = [ln for ln in metrics.splitlines() if ln.startswith(prefix)]
        assert granted and float(granted[0].split()[-1]) >= 1
        assert json.loads(http_get(f"http://127.0.0.1:{port}/stats")[1])["requests"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        for child in children:
            wait_for(
                lambda child=child: not os.path.exists(f"/proc/{child}"),
                timeout=10,
                what=f"child {child} gone",
            )
    finally:
        if proc.poll() is None:
            # SIGINT stops the three in order; killing `up` alone would orphan them (each
            # runs in a session of its own), so a failed test stops them itself.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
