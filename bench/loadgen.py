"""A paced HTTP/1.1 load generator that records every request: start, latency, status.

wrk reports one latency distribution for everything; the spike and slicing
scenarios need admitted requests and 503s apart, and a time series.  Each
client is one keep-alive connection sending one request per ``interval`` (or
as soon as the previous answer arrived, when that took longer): a closed loop
with a rate cap, so a fast 503 does not turn a client into a flood.

Stdlib + uvloop (a dependency of backdial).  Runs in its own process, pinned
beside wrk, started by the scenario with ``python bench/loadgen.py SPEC`` and
answering with JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass

# uvloop's loop.time() has millisecond resolution; latencies need better.
clock = time.perf_counter


@dataclass
class Phase:
    """``clients`` extra connections from ``start`` to ``end`` (seconds from t0)."""

    clients: int
    start: float
    end: float
    interval: float
    path: str
    headers: tuple[str, ...] = ()
    label: str = ""


async def _client(
    host: str, port: int, phase: Phase, t0: float, out: list[tuple[float, float, int, str]]
) -> None:
    await asyncio.sleep(max(0.0, t0 + phase.start - clock()))
    head = [f"GET {phase.path} HTTP/1.1", f"Host: {host}:{port}", *phase.headers, "", ""]
    request = "\r\n".join(head).encode()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    next_at = clock()
    end = t0 + phase.end
    try:
        while clock() < end:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            start = clock()
            writer.write(request)
            status, close = await _response(reader)
            done = clock()
            out.append((start - t0, done - start, status, phase.label))
            if close:
                writer.close()
                reader = writer = None
            next_at = max(next_at + phase.interval, done)
            await asyncio.sleep(max(0.0, next_at - clock()))
    except (OSError, asyncio.IncompleteReadError, ValueError):
        out.append((clock() - t0, 0.0, 0, phase.label))  # 0: a connection error
    finally:
        if writer is not None:
            writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection":
            close = b"close" in value.lower()
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length > 0:
        await reader.readexactly(length)
    return status, close


async def run(
    host: str, port: int, phases: list[Phase]
) -> tuple[float, list[tuple[float, float, int, str]]]:
    """(wall-clock time of t0, records); record times are seconds from t0."""
    out: list[tuple[float, float, int, str]] = []
    t0 = clock() + 0.2
    t0_wall = time.time() + 0.2
    tasks = [
        asyncio.ensure_future(_client(host, port, ph, t0, out))
        for ph in phases
        for _ in range(ph.clients)
    ]
    await asyncio.gather(*tasks)
    return t0_wall, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help='JSON: {"host", "port", "phases": [Phase fields...]}')
    spec = json.loads(p.parse_args().spec)
    phases = [Phase(**{**ph, "headers": tuple(ph.get("headers", ()))}) for ph in spec["phases"]]
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    t0_wall, records = asyncio.run(run(spec["host"], int(spec["port"]), phases))
    json.dump({"t0_wall": t0_wall, "records": records}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
