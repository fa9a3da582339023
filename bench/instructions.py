#!/usr/bin/env python3
"""Instructions per request of the sidecar (and the service), counted by callgrind.

    python3 bench/instructions.py --conns 16 --seconds 5
    python3 bench/instructions.py --close          # a new client connection per request

CPU time on a shared machine moves with everything else that runs; instruction
counts do not.  This runs acceptor, service and sidecar as ``bench/suite.py``
does, with the sidecar (``--service`` also the service) under
``valgrind --tool=callgrind --collect-atstart=no``, warms up, switches collection
on for a wrk run, and divides the instructions by the requests the sidecar
answered in that window.  A development tool: compare two commits' figures from
the same machine, never with the suite's CPU times.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import answered, one_slice, wait_registered, write_policy
from harness import BenchError, Workspace, log, start_backdial, wrk


def _callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "backdial.cli",
    ]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def _total(files: list[Path]) -> int:
    total = 0
    for f in files:
        m = re.search(r"^(?:summary|totals):\s+(\d+)", f.read_text(errors="replace"), re.M)
        if m:
            total += int(m.group(1))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--close", action="store_true", help="Connection: close on every request")
    p.add_argument("--path", default="/")
    p.add_argument("--keep-tmp", action="store_true")
    ns = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        log("valgrind missing: apt-get install -y valgrind")
        return 1
    ws = Workspace(keep=ns.keep_tmp)
    try:
        out = ws.path("callgrind.out")
        stack = start_backdial(
            ws,
            None,
            ns.sessions,
            1,
            sidecar_prefix=_callgrind(out),
            config=write_policy(ws, "cg", one_slice(10_000, "30s")),
        )
        wait_registered(stack, ns.sessions)
        sidecar = next(proc for proc in stack.proxy if proc.name == "sidecar")
        pid = next(iter(proc for proc in sidecar.pids() if proc != sidecar.pid), sidecar.pid)
        headers = ["Connection: close"] if ns.close else []
        url = stack.url_for(ns.path)
        wrk(url, ns.conns, 2.0, 2, None, headers)  # warm-up under valgrind
        time.sleep(0.5)
        n0 = answered(stack)
        _control(pid, "-i", "on")
        res = wrk(url, ns.conns, ns.seconds, 2, None, headers)
        _control(pid, "-i", "off")
        n1 = answered(stack)
        _control(pid, "-d")
        time.sleep(1.0)
        files = sorted(ws.dir.glob("callgrind.out*"))
        total = _total(files)
        n = max(1.0, n1 - n0)
        print(
            f"sidecar: {total / n:,.0f} instructions per request "
            f"({total:,} over {n:,.0f} requests, wrk {res.rps:,.0f} req/s under valgrind, "
            f"c={ns.conns}{', Connection: close' if ns.close else ''})"
        )
        if ns.keep_tmp:
            print(f"profiles: {', '.join(str(f) for f in files)} (callgrind_annotate)")
    except (BenchError, subprocess.CalledProcessError) as exc:
        log(f"error: {exc}")
        return 1
    finally:
        ws.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
