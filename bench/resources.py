"""Scenarios about memory and bytes: sessions, large bodies, slow readers.

(RSS per idle client connection, on fresh stacks, is ``idle.py``.)

* **sessions**: RSS of the acceptor and the sidecar with 16 and with 1,024
  registered sessions, after the same warm-up that leases every session;
  the difference divided by the extra sessions.
* **large bodies**: MB/s of 10 MiB responses (``/stream``, chunked) through
  each proxy, ``wrk -c4``.
* **slow readers**: fast-client req/s with 50 clients each reading an 8 MiB
  response at 1 KiB/s, against the quiet run (``slow_clients.SlowClients``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import backdial_stack, one_slice, stop_stack
from harness import Stack, Workspace, http_get, log, rss_kib, wrk
from slow_clients import SlowClients, sessions_busy


def _state(url: str) -> dict[str, Any]:
    status, body = http_get(url + "/v1/state", timeout=5)
    return json.loads(body) if status == 200 else {}


def session_memory(
    ws: Workspace,
    server_cpus: str | None,
    wrk_cpus: str | None,
    small: int = 16,
    large: int = 1024,
) -> dict[str, Any]:
    """Acceptor and sidecar RSS per registered (and leased) session."""
    rows: dict[int, dict[str, Any]] = {}
    for n in (small, large):
        stack = backdial_stack(ws, server_cpus, f"mem-s{n}", n, one_slice(4096, "30s"))
        try:
            acceptor = next(p for p in stack.proxy if p.name == "acceptor")
            sidecar = next(p for p in stack.proxy if p.name == "sidecar")
            time.sleep(0.5)
            idle_acc = rss_kib(acceptor.pids())
            # every session carries a request at once: each is leased to the sidecar
            wrk(stack.url_for("/delay?ms=200"), large, 3.0, 2, wrk_cpus)
            time.sleep(0.5)
            rows[n] = {
                "sessions": n,
                "acceptor_rss_kib": idle_acc,
                "acceptor_rss_after_kib": rss_kib(acceptor.pids()),
                "sidecar_rss_kib": rss_kib(sidecar.pids()),
                "held": int(_state(stack.extra["sidecar_admin"]).get("held", 0)),
            }
            log(f"sessions {n}: {rows[n]}")
        finally:
            stop_stack(ws, stack)
    a, b = rows[small], rows[large]
    extra = large - small
    held = max(1, b["held"] - a["held"])
    return {
        "rows": [a, b],
        "acceptor_bytes_per_session": (b["acceptor_rss_kib"] - a["acceptor_rss_kib"])
        * 1024
        / extra,
        "sidecar_bytes_per_leased_session": (b["sidecar_rss_kib"] - a["sidecar_rss_kib"])
        * 1024
        / held,
    }


def large_bodies(
    stacks: dict[str, Stack], wrk_cpus: str | None, mib: int = 10, seconds: float = 4.0
) -> list[dict[str, Any]]:
    size = 16384
    path = f"/stream?chunks={mib * 1024 * 1024 // size}&size={size}"
    out = []
    for name, stack in stacks.items():
        url = stack.url_for(path)
        wrk(url, 4, 1.0, 2, wrk_cpus)
        res = wrk(url, 4, seconds, 2, wrk_cpus)
        mbps = res.bytes_per_s / 1e6
        log(f"{mib} MiB responses via {name}: {mbps:,.0f} MB/s, {res.rps:.1f} req/s")
        out.append(
            {
                "target": name,
                "mib": mib,
                "mb_per_s": mbps,
                "rps": res.rps,
                "p99_ms": res.p99_ms,
                "errors": res.errors,
            }
        )
    return out


def slow_readers(
    stack: Stack,
    wrk_cpus: str | None,
    body_kib: int = 8192,
    clients: int = 50,
    seconds: float = 5.0,
    conns: int = 16,
) -> dict[str, Any]:
    """Fast-client req/s with *clients* slow readers of *body_kib* each, vs quiet."""
    size = 16 * 1024
    path = f"/stream?chunks={max(1, body_kib * 1024 // size)}&size={size}"
    wrk(stack.url, conns, 1.0, 2, wrk_cpus)
    quiet = wrk(stack.url, conns, seconds, 2, wrk_cpus)
    slow = SlowClients(stack.port, path, clients, 1024, 4096)
    admin = stack.extra.get("sidecar_admin")
    try:
        slow.start()
        time.sleep(1.5)
        held = sessions_busy(admin) if admin else None
        loaded = wrk(stack.url, conns, seconds, 2, wrk_cpus)
    finally:
        stats = slow.stop()
    ratio = loaded.rps / quiet.rps if quiet.rps else float("nan")
    log(
        f"slow readers via {stack.name}: {quiet.rps:,.0f} -> {loaded.rps:,.0f} req/s "
        f"({ratio:.3f}), slow 200s {stats['status_200']}/{clients}, sessions busy {held}"
    )
    return {
        "target": stack.name,
        "body_kib": body_kib,
        "clients": clients,
        "quiet_rps": quiet.rps,
        "slow_rps": loaded.rps,
        "ratio": ratio,
        "quiet_p99_ms": quiet.p99_ms,
        "slow_p99_ms": loaded.p99_ms,
        "fast_errors": loaded.errors,
        "sessions_busy": held,
        "slow_clients": stats,
    }
