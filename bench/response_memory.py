"""Slow readers of large responses: what the sidecar holds in memory, with and without a budget.

    python3 bench/response_memory.py                   # 128 readers of 6 MiB each
    python3 bench/response_memory.py --clients 64 --mib 8

For each sidecar configuration, in the same run: an acceptor, ``backdial
serve`` (the demo app, 4 sessions) and a one-worker sidecar on 127.0.0.1.
``--clients`` raw sockets (SO_RCVBUF 8 KiB) each send ``GET /stream`` for a
``--mib`` MiB response (more than the kernel's socket buffers take: loopback
TCP send buffers grow to 4 MiB) and read nothing until the sidecar has finished every
response (``backdial_sidecar_requests_total`` = clients: the sessions were not
held by the slow readers).  Then the sidecar's RSS and gauges are sampled,
and every client reads its response to the end (each must be complete).

Configurations: ``unbounded`` (``--response-memory-total 1024g``, as before
the budget existed: each connection keeps up to ``--response-buffer`` 1 MiB),
``default`` (64 MiB) and ``16m``.  The report gives the sidecar's RSS before
the load, with every response parked, and the growth, plus the
``response_buffered_bytes`` and ``response_spilled_bytes`` gauges.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    HOST,
    BenchError,
    Proc,
    Workspace,
    backdial_cmd,
    free_port,
    http_get,
    log,
    raise_fd_limit,
    rss_kib,
    wait_http,
)

CONFIGS = (("unbounded", "1024g"), ("default", "64m"), ("16m", "16m"))


def _metric(text: str, name: str, code: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        series = line.split("{", 1)[0].split(" ", 1)[0]
        if series == name and (not code or f'code="{code}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _read_all(sock: socket.socket, want: int) -> int:
    """Read one chunked response; the number of body bytes."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1 << 20)
        if not data:
            raise BenchError("connection closed before the response head")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"unexpected response {head[:60]!r}")
    body, buf = 0, bytearray(rest)
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(1 << 20)
        line, _, rest = bytes(buf).partition(b"\r\n")
        size = int(line, 16)
        buf = bytearray(rest)
        while len(buf) < size + 2:
            data = sock.recv(1 << 20)
            if not data:
                raise BenchError(f"truncated after {body} of {want} bytes")
            buf += data
        body += size
        del buf[: size + 2]
        if size == 0:
            return body


def run_one(ws: Workspace, name: str, budget: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = ws.path(f"run-{name}")
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_text(
        "slices: [{name: default, share: 100, queue: {maxWaiting: 1000, timeout: 120s}}]\n"
    )
    port, admin = free_port(), f"{HOST}:{free_port()}"
    procs: list[Proc] = []

    def start(role: str, *argv: str) -> Proc:
        proc = Proc(f"{role}-{name}", backdial_cmd(*argv), ws.path(f"{role}-{name}.log"))
        proc.start()
        procs.append(proc)
        return proc

    try:
        acc_admin = f"{HOST}:{free_port()}"
        start("acceptor", "acceptor", "--run-dir", str(run_dir), "--config", str(config),
              "--admin", acc_admin, "--log-level", "warning")  # fmt: skip
        wait_http(f"http://{acc_admin}/healthz", 20, procs)
        register = f"unix://{run_dir}/register.sock"
        start("serve", "serve", "backdial.demo:app", "--register", register,
              "--sessions", "4", "--log-level", "warning")  # fmt: skip
        sidecar = start("sidecar", "sidecar", "--run-dir", str(run_dir), "--listen",
                        f"{HOST}:{port}", "--admin", admin, "--workers", "1",
                        "--spill-dir", str(run_dir), "--response-memory-total", budget,
                        "--log-level", "warning")  # fmt: skip
        wait_http(f"http://{admin}/readyz", 30, procs)
        before = rss_kib([sidecar.pid])
        chunks = args.mib * 16  # 64 KiB chunks
        target = b"GET /stream?chunks=%d&size=65536 HTTP/1.1\r\nHost: b\r\n\r\n" % chunks
        socks = []
        for _ in range(args.clients):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            s.connect((HOST, port))
            s.settimeout(120)
            s.sendall(target)
            socks.append(s)
        end = time.monotonic() + 300
        while True:
            text = http_get(f"http://{admin}/metrics")[1].decode()
            done = _metric(text, "backdial_sidecar_requests_total", code="200")
            if done >= args.clients:
                break
            if time.monotonic() > end:
                raise BenchError(f"{name}: only {done:.0f} responses left their sessions")
            time.sleep(0.2)
        parked = rss_kib([sidecar.pid])
        gauges = {
            g: _metric(text, f"backdial_sidecar_{g}")
            for g in ("response_buffered_bytes", "response_spilled_bytes", "leases_busy")
        }
        sizes = [_read_all(s, chunks * 65536) for s in socks]
        for s in socks:
            s.close()
        complete = sum(1 for n in sizes if n == chunks * 65536)
        return {
            "config": name,
            "response_memory_total": budget,
            "rss_before_mib": round(before / 1024, 1),
            "rss_parked_mib": round(parked / 1024, 1),
            "growth_mib": round((parked - before) / 1024, 1),
            "buffered_mib": round(gauges["response_buffered_bytes"] / 2**20, 1),
            "spilled_mib": round(gauges["response_spilled_bytes"] / 2**20, 1),
            "sessions_busy_while_parked": int(gauges["leases_busy"]),
            "complete": complete,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=128, help="slow readers (default 128)")
    p.add_argument("--mib", type=int, default=6, help="MiB per response (default 6)")
    p.add_argument("--out", help="result file stem (default bench/results/<time>-respmem)")
    args = p.parse_args()
    raise_fd_limit()
    ws = Workspace()
    try:
        rows = []
        for name, budget in CONFIGS:
            log(f"{name}: {args.clients} readers of {args.mib} MiB")
            rows.append(run_one(ws, name, budget, args))
            log(json.dumps(rows[-1]))
    finally:
        ws.stop_all()
    stem = (
        Path(args.out)
        if args.out
        else BENCH_DIR / "results" / time.strftime("%Y%m%dT%H%M%S-respmem")
    )
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [
        f"{args.clients} slow readers of {args.mib} MiB responses, sidecar with 1 worker:",
        "",
        "| config | RSS before | RSS parked | growth | buffered | spilled | busy | complete |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['config']} ({r['response_memory_total']}) | {r['rss_before_mib']} MiB "
            f"| {r['rss_parked_mib']} MiB | {r['growth_mib']} MiB | {r['buffered_mib']} MiB "
            f"| {r['spilled_mib']} MiB | {r['sessions_busy_while_parked']} "
            f"| {r['complete']}/{args.clients} |"
            for r in rows
        ),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
