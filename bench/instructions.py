#!/usr/bin/env python3
"""Instructions per request of the sidecar (and the service), counted by callgrind.

    python3 bench/instructions.py --conns 16 --seconds 5
    python3 bench/instructions.py --close          # a new client connection per request

CPU time on a shared machine moves with everything else that runs; instruction
counts do not.  This runs acceptor, service and sidecar as ``bench/suite.py``
does, with the sidecar under callgrind collecting only inside libuv's ``uv_run``
(the event loop: everything after start-up), drives it with wrk, and divides the
instructions by the requests the sidecar answered (warm-up included, so the
loop's own start-up work is spread over thousands of requests).  A development
tool: compare two commits' figures, never with the suite's CPU times.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import answered, one_slice, wait_registered, write_policy
from harness import BenchError, Workspace, log, start_backdial, wrk


def _callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        "--toggle-collect=uv_run",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "backdial.cli",
    ]


def _total(files: list[Path]) -> int:
    total = 0
    for f in files:
        m = re.search(r"^(?:summary|totals):\s+(\d+)", f.read_text(errors="replace"), re.M)
        if m:
            total += int(m.group(1))
    return total


def _one(ns: argparse.Namespace, seconds: float) -> tuple[int, float]:
    """(instructions in the sidecar's event loop, requests answered) for one wrk run."""
    ws = Workspace(keep=ns.keep_tmp)
    try:
        stack = start_backdial(
            ws,
            None,
            ns.sessions,
            1,
            sidecar_prefix=_callgrind(ws.path("callgrind.out")),
            config=write_policy(ws, "cg", one_slice(10_000, "30s")),
            ready_timeout=180.0,
        )
        wait_registered(stack, ns.sessions)
        sidecar = next(proc for proc in stack.proxy if proc.name == "sidecar")
        headers = ["Connection: close"] if ns.close else []
        wrk(stack.url_for(ns.path), ns.conns, seconds, 2, None, headers)
        n = answered(stack)
        sidecar.stop()  # callgrind writes its profile at exit
        files = sorted(ws.dir.glob("callgrind.out*"))
        if ns.keep_tmp:
            log(f"profiles: {', '.join(str(f) for f in files)} (callgrind_annotate)")
        return _total(files), n
    finally:
        ws.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--close", action="store_true", help="Connection: close on every request")
    p.add_argument("--path", default="/")
    p.add_argument("--keep-tmp", action="store_true")
    ns = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        log("valgrind missing: apt-get install -y valgrind")
        return 1
    try:
        short = _one(ns, 1.0)
        long = _one(ns, ns.seconds + 1.0)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    # start-up work inside the loop (control connection, CONFIG, ...) is the same in both
    # runs: the slope between them is the cost of one request
    per_req = (long[0] - short[0]) / max(1.0, long[1] - short[1])
    print(
        f"sidecar: {per_req:,.0f} instructions per request (slope between {short[1]:,.0f} and "
        f"{long[1]:,.0f} requests; c={ns.conns}{', Connection: close' if ns.close else ''}, "
        f"path {ns.path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
