#!/usr/bin/env python3
"""The sidecar's own Python cost per request, in process, without sockets.

    python3 bench/inproc.py                 # µs per request (best of --repeat)
    python3 bench/inproc.py --profile       # ... and a cProfile of the request path
    python3 bench/inproc.py --instructions  # CPU instructions per request (callgrind)

The real ``ListenerState``, ``ClientProtocol``, ``LeasePool`` and ``SessionConn``
run on a real event loop, but their transports are stand-ins that only collect
bytes, and the response is fed straight into the session connection.  So the
figure is the proxy's Python work for one keep-alive request (parse, classify,
lease, rewrite, relay, release), without the event loop's dispatch and the four
socket syscalls the suite's CPU figures include.  ``--instructions`` counts the
instructions instead (valgrind's callgrind, the slope between two run lengths),
which does not move with the machine's load at all: use it to keep or drop a
change to the hot path; use ``bench/suite.py`` for claims.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 20\r\n\r\nhello from backdial\n"
)


class _Transport:
    """What the protocols call on a transport; writes are counted and dropped."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


async def _setup(sessions: int, clients: int) -> tuple[list[Any], list[Any], Any]:
    from backdial.sidecar.config import ProxySettings
    from backdial.sidecar.lease import Lease
    from backdial.sidecar.leasepool import LeasePool
    from backdial.sidecar.proxy import make_protocol_factory
    from backdial.sidecar.sessionconn import SessionConn
    from backdial.sidecar.stats import ProxyStats

    async def no_factory(lease: Lease) -> Any:
        raise OSError("not used")

    pool = LeasePool(Path(tempfile.gettempdir()), no_factory, "inproc")
    conns = []
    for sid in range(sessions):
        a, b = socket.socketpair()
        b.close()
        lease = Lease(sid, "", "default", sid % 2, a, ("", "default"), epoch=pool._epoch)
        conn = SessionConn(lease, pool)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        pool.held[sid] = conn
        pool.idle[lease.key].append(conn)
        conns.append(conn)
    factory, _ = make_protocol_factory(pool, ProxySettings(), ProxyStats())
    clients = [factory() for _ in range(clients)]
    for client in clients:
        client.connection_made(_Transport())  # type: ignore[arg-type]
    return clients, conns, factory


def _run_close(factory: Any, conns: list[Any], n: int) -> float:
    """A new client connection per request (``Connection: close``): accept to close."""
    by_id = {c.lease.session: c for c in conns}
    request = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    t0 = time.perf_counter()
    for _ in range(n):
        client = factory()
        client.connection_made(_Transport())
        client.data_received(request)
        (sid,) = client.pool.busy
        by_id[sid].data_received(RESPONSE)
        client.connection_lost(None)
    return (time.perf_counter() - t0) / n * 1e6


def _run(clients: list[Any], conns: list[Any], n: int) -> float:
    """One request per client per round; every busy session answers; with more clients
    than sessions the rest wait in the pool's queue and are handed the freed sessions."""
    by_id = {c.lease.session: c for c in conns}
    pool = clients[0].pool
    rounds = max(1, n // len(clients))
    t0 = time.perf_counter()
    for _ in range(rounds):
        for client in clients:
            client.data_received(REQUEST)
        while pool.busy or pool.waiting:
            for sid in list(pool.busy):
                by_id[sid].data_received(RESPONSE)
            if pool._handoffs:
                pool._deliver()  # what the loop's call_soon does at the end of the iteration
    return (time.perf_counter() - t0) / (rounds * len(clients)) * 1e6


async def _main(ns: argparse.Namespace) -> int:
    clients, conns, factory = await _setup(ns.sessions, ns.clients or ns.sessions)

    def run(n: int) -> float:
        return _run_close(factory, conns, n) if ns.close else _run(clients, conns, n)

    run(ns.warmup)  # warm-up: caches, classifier, status lines
    best = min(run(ns.requests) for _ in range(ns.repeat))
    assert clients[0].stats.slices["default"].status[200] >= ns.requests
    runs = f"best of {ns.repeat} runs of {ns.requests}"
    top: list[dict[str, Any]] = []
    if ns.profile or ns.json:
        prof = cProfile.Profile()
        prof.enable()
        run(ns.requests)
        prof.disable()
        stats = pstats.Stats(prof)
        top = profile_rows(stats, max(1, ns.requests // len(clients)) * len(clients))
    if ns.json:
        print(json.dumps({"us_per_request": best, "clients": len(clients), "top": top}))
        return 0
    print(f"sidecar Python path: {best:.2f} µs per request ({runs})")
    if ns.profile:
        stats.sort_stats("tottime").print_stats(25)
    return 0


def profile_rows(stats: pstats.Stats, requests: int, n: int = 20) -> list[dict[str, Any]]:
    """The *n* functions with the most own time: share of all own time, calls per request."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in table.values()) or 1.0
    rows = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    out = []
    for (file, line, name), (_cc, calls, tottime, cumtime, _) in rows:
        where = Path(file).name if file != "~" else ""
        out.append(
            {
                "function": f"{where}:{line}({name})" if where else name,
                "calls_per_request": calls / requests,
                "self_pct": tottime / total * 100,
                "cum_pct": cumtime / total * 100,
            }
        )
    return out


def _instructions(ns: argparse.Namespace) -> int:
    """Instructions per request: callgrind totals of two run lengths, their slope."""
    totals = []
    for n in (1000, 1000 + ns.requests):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cg.out"
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            argv += [sys.executable, __file__, "--requests", str(n), "--repeat", "1"]
            argv += ["--warmup", "500", "--sessions", str(ns.sessions)]
            argv += ["--clients", str(ns.clients or ns.sessions)]
            argv += ["--close"] if ns.close else []
            subprocess.run(argv, check=True, capture_output=True)
            m = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(), re.M)
            assert m is not None
            totals.append(int(m.group(1)))
    per = (totals[1] - totals[0]) / ns.requests
    print(f"sidecar Python path: {per:,.0f} instructions per request (callgrind)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--clients", type=int, default=0, help="client connections (default: sessions)")
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--close", action="store_true", help="a new client connection per request")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--instructions", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON line: time and profile rows")
    ns = p.parse_args(argv)
    if ns.instructions:
        return _instructions(ns)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_main(ns))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
