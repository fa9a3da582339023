"""Proxy memory per idle client connection, every peer on a fresh stack.

Each target (nginx-dialing, nginx-keepalive, haproxy, backdial and backdial-python)
is started anew for this measurement, so its heap has not been grown by earlier load
(the stacks of the throughput runs had room to spare and showed 0 bytes). The peers get
room for the connections (nginx ``worker_connections``, haproxy ``maxconn``) and header
or idle timeouts longer than the measurement; otherwise they are the suite's configs.
On that fresh stack, after it has answered its start-up health check:

1. RSS of the proxy processes (backdial: the sidecar, which owns client connections;
   nginx: master + worker) and the machine's kernel memory (slab + TCP buffers);
2. *N* client connections that send nothing (``idle``); the proxy's own count of open
   client connections must reach *N* (nginx ``stub_status``, haproxy ``show info``,
   the sidecar's ``backdial_sidecar_client_connections``) before RSS is read again,
   and must still be *N* after, else the row says so and gives no figure;
3. then each connection sends a partial request head that never ends (``head``, what a
   slowloris client holds open); RSS is read once the kernel shows no unread byte on
   the proxy's side of any of them.

Bytes per connection are RSS growth ÷ *N*. RSS moves in pages; growth below one page is
reported as a bound ("< page ÷ N"), never as 0. Kernel socket memory is not part of
RSS: it is reported apart, machine-wide and for both ends of each loopback connection
(the client's socket is in this process), so it is indicative only on a busy machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import stop_stack, wait_registered
from harness import (
    HOST,
    BenchError,
    IdleLimits,
    Stack,
    Workspace,
    free_port,
    http_get,
    log,
    rss_kib,
    start_backdial,
    start_haproxy,
    start_nginx,
)
from report import per_conn_text

TARGETS = ("nginx-dialing", "nginx-keepalive", "haproxy", "backdial", "backdial-python")
PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT_S = 120  # the peers' header/idle timeouts: longer than one target's measurement
# A slowloris-style head: a request line and two fields, never the blank line that ends it.
PARTIAL_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: backdial-bench-idle\r\n"


SLACK = 256  # connections the peers may hold beside the measured ones (status, health)

# ---------------------------------------------------------------- pure parts


def fit_connections(want: int, fd_limit: int) -> int:
    """The most connections, up to *want*, that every peer can hold under *fd_limit*
    open files: haproxy reserves two descriptors per ``maxconn`` (client and server
    side) and refuses to start beyond the limit. Multiples of 500."""
    fit = ((fd_limit - 64) // 2 - SLACK) // 500 * 500
    if fit <= 0:
        raise BenchError(f"an open-file limit of {fd_limit} leaves no room for connections")
    return min(want, fit)


def per_connection(before_kib: int, after_kib: int, n: int, page: int = PAGE) -> dict[str, Any]:
    """RSS growth per connection; ``bytes`` is None when growth is below one page, and
    ``below`` is then the bound (one page ÷ *n*) the measurement can resolve."""
    if n <= 0:
        raise ValueError(f"connections must be > 0, got {n}")
    grew = (after_kib - before_kib) * 1024
    if grew < page:
        return {"grew_bytes": grew, "bytes": None, "below": page / n}
    return {"grew_bytes": grew, "bytes": grew / n, "below": None}


def parse_stub_status(text: str) -> int:
    """Client connections open in nginx, without the one asking (``stub_status``)."""
    m = re.search(r"Active connections:\s*(\d+)", text)
    if not m:
        raise BenchError(f"no 'Active connections' in stub_status: {text[:200]!r}")
    return int(m.group(1)) - 1


def parse_show_info(text: str) -> int:
    """Current connections of haproxy (``show info`` on its stats socket)."""
    m = re.search(r"^CurrConns:\s*(\d+)", text, re.M)
    if not m:
        raise BenchError(f"no CurrConns in haproxy's show info: {text[:200]!r}")
    return int(m.group(1))


def metric_value(text: str, name: str) -> float:
    """Sum of a Prometheus text-format metric over its label sets."""
    found, total = False, 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            found, total = True, total + float(line.rsplit(None, 1)[1])
    if not found:
        raise BenchError(f"no {name} in the metrics")
    return total


def kernel_kib(meminfo: str, sockstat: str, page: int = PAGE) -> int:
    """Machine-wide kernel memory that sockets use: slab (socket, inode, file, epoll
    objects) plus TCP buffer pages."""
    slab = re.search(r"^Slab:\s+(\d+) kB", meminfo, re.M)
    tcp = re.search(r"^TCP:.*\bmem (\d+)", sockstat, re.M)
    if not slab or not tcp:
        raise BenchError("no Slab in /proc/meminfo or no TCP mem in /proc/net/sockstat")
    return int(slab.group(1)) + int(tcp.group(1)) * page // 1024


# ---------------------------------------------------------------- the measurement


def _kernel_now() -> int:
    return kernel_kib(Path("/proc/meminfo").read_text(), Path("/proc/net/sockstat").read_text())


def accepted(stack: Stack) -> int:
    """Client connections the proxy itself counts as open."""
    extra = stack.extra
    if "sidecar_admin" in extra:
        status, body = http_get(extra["sidecar_admin"] + "/metrics", timeout=5)
        if status != 200:
            raise BenchError(f"{stack.name}: sidecar /metrics answered {status}")
        return int(metric_value(body.decode(), "backdial_sidecar_client_connections"))
    if "nginx_status" in extra:
        status, body = http_get(extra["nginx_status"], timeout=5)
        if status != 200:
            raise BenchError(f"{stack.name}: stub_status answered {status}")
        return parse_stub_status(body.decode())
    if "haproxy_stats" in extra:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(extra["haproxy_stats"])
            s.sendall(b"show info\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return parse_show_info(b"".join(chunks).decode())
    raise BenchError(f"{stack.name}: no way to count its client connections")


def _unread_bytes(port: int) -> tuple[int, int]:
    """(established connections on the proxy's side of *port*, bytes received on them
    but not yet read by the proxy)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    queues = [int(line.split()[0]) for line in out.splitlines() if line.strip()]
    return len(queues), sum(queues)


def heads_read(port: int, n: int) -> bool:
    listed, unread = _unread_bytes(port)
    return listed >= n and unread == 0


def _wait(what: str, done: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise BenchError(f"{what} not reached in {timeout:.0f} s")
        time.sleep(0.05)


def measure(stack: Stack, n: int, batch: int = 500, settle: float = 0.5) -> dict[str, Any]:
    """RSS before, with *n* idle connections, and with a partial head on each."""
    pids = [pid for p in stack.proxy if p.name != "acceptor" for pid in p.pids()]
    row: dict[str, Any] = {"target": stack.name, "connections": n, "pids": len(pids)}
    time.sleep(settle)
    base_open = accepted(stack)  # 0, unless a health check's keep-alive is still open
    row["rss_before_kib"], kernel_before = rss_kib(pids), _kernel_now()
    socks: list[socket.socket] = []
    linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT left for later parts
    counted = 0

    def all_counted() -> bool:
        nonlocal counted
        counted = accepted(stack) - base_open
        return counted >= len(socks)

    try:
        while len(socks) < n:
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.settimeout(10)
                s.connect((HOST, stack.port))
                socks.append(s)
            _wait(f"{stack.name}: {len(socks)} connections counted by the proxy", all_counted, 30)
        time.sleep(settle)
        row["rss_idle_kib"], kernel_idle = rss_kib(pids), _kernel_now()
        _wait(f"{stack.name}: {n} connections still open", all_counted, 5)
        for s in socks:
            s.sendall(PARTIAL_HEAD)
        # read by the proxy: every connection listed (the filter matched), none with bytes queued
        _wait(f"{stack.name}: the partial heads read", lambda: heads_read(stack.port, n), 30)
        time.sleep(settle)
        row["rss_head_kib"] = rss_kib(pids)
        _wait(f"{stack.name}: {n} connections open after the heads", all_counted, 5)
    except (BenchError, OSError) as exc:  # no figure, and the rest of the run goes on
        row["error"] = f"{exc} (the proxy counted {counted} of {len(socks)} opened)"
        log(f"idle connections {stack.name}: {row['error']}")
        return row
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    row["accepted"] = counted
    row["idle"] = per_connection(row["rss_before_kib"], row["rss_idle_kib"], n)
    row["head"] = per_connection(row["rss_before_kib"], row["rss_head_kib"], n)
    row["head_extra"] = per_connection(row["rss_idle_kib"], row["rss_head_kib"], n)
    row["kernel_bytes_per_connection"] = (kernel_idle - kernel_before) * 1024 / n
    log(
        f"idle connections {stack.name}: RSS {row['rss_before_kib']} -> {row['rss_idle_kib']} "
        f"-> {row['rss_head_kib']} KiB; per connection idle {per_conn_text(row['idle'])} B, "
        f"with a partial head {per_conn_text(row['head'])} B; kernel (both ends) "
        f"{row['kernel_bytes_per_connection']:,.0f} B"
    )
    return row


def fresh_stack(
    ws: Workspace, target: str, backend: Stack, cpus: str | None, n: int, sessions: int
) -> Stack:
    """*target* started anew, with room for *n* connections and long idle timeouts."""
    limits = IdleLimits(max_conns=n + SLACK, timeout_s=TIMEOUT_S, status_port=free_port())
    if target.startswith("nginx-"):
        # nginx closes idle ("reusable") connections once fewer than 1/16 of its
        # worker_connections are free: leave that sixteenth free.
        limits = replace(limits, max_conns=n + n // 15 + SLACK)
        return start_nginx(ws, backend, target == "nginx-keepalive", cpus, limits)
    if target == "haproxy":
        return start_haproxy(ws, backend, cpus, limits)
    if target not in ("backdial", "backdial-python"):
        raise BenchError(f"unknown idle-connection target {target}")
    timeouts = ["--request-timeout", str(TIMEOUT_S), "--client-idle-timeout", str(TIMEOUT_S)]
    engine = ["--engine", "python"] if target == "backdial-python" else []
    name = f"{target}-idle"  # its own run directory, apart from the suite's stack
    stack = start_backdial(ws, cpus, sessions, sidecar_args=[*timeouts, *engine], name=name)
    stack.name = target
    wait_registered(stack, sessions)
    return stack


def idle_connections(
    ws: Workspace,
    backend: Stack,
    targets: list[str],
    cpus: str | None,
    n: int = 10_000,
    sessions: int = 16,
) -> dict[str, Any]:
    """Every target measured on its own fresh stack, stopped before the next starts."""
    t0 = time.monotonic()
    want, n = n, fit_connections(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if n < want:
        log(f"idle connections: {n:,} instead of {want:,}, what the open-file limit allows")
    rows = []
    for target in targets:
        try:
            stack = fresh_stack(ws, target, backend, cpus, n, sessions)
        except BenchError as exc:  # one peer that cannot start costs its row, not the run
            log(f"idle connections {target}: {exc}")
            rows.append({"target": target, "connections": n, "error": f"did not start: {exc}"})
            continue
        try:
            rows.append(measure(stack, n))
        finally:
            stop_stack(ws, stack)
    return {
        "connections": n,
        "requested": want,
        "page_bytes": PAGE,
        "partial_head": PARTIAL_HEAD.decode(),
        "rows": rows,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
