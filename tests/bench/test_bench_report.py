# ruff: noqa: RUF001  (the multiplication sign is the ratio sign in the report)
"""The benchmark suite's pure parts: wrk parsing, percentiles, target verdicts, the report.

The suite itself needs nginx, haproxy and wrk and a quiet machine, so it does not run
in CI; what decides its verdicts and renders its figures is tested here.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _import_bench(*names: str) -> list[ModuleType]:
    """Import bench/ modules without leaving them on sys.path or in sys.modules.

    bench/ is a folder of scripts, and its ``harness`` module shares its name with
    e2e/cluster's; leaving either in ``sys.modules`` would hand the wrong one to the
    other's importers in the same pytest session.
    """
    bench = str(Path(__file__).resolve().parents[2] / "bench")
    before = set(sys.modules)
    saved = {name: sys.modules.pop(name) for name in ("harness", *names) if name in sys.modules}
    sys.path.insert(0, bench)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(bench)
        for name in set(sys.modules) - before:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if module_file.startswith(bench):
                del sys.modules[name]
        sys.modules.update(saved)


capacity, harness, loadgen, report = _import_bench("capacity", "harness", "loadgen", "report")

WRK_OUT = """Running 5s test @ http://127.0.0.1:1/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.00us  100.00us   3.00ms   90.00%
  Latency Distribution
     50%  480.00us
     75%  520.00us
     90%  600.00us
     99%    1.20ms
  150000 requests in 5.00s, 20.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  30000.00
Transfer/sec:      4.00MB
"""


def test_parse_wrk_reads_rate_latency_errors_and_transfer() -> None:
    res = harness.parse_wrk(WRK_OUT)
    assert res.requests == 150000
    assert res.rps == 30000.0
    assert res.p50_ms == pytest.approx(0.48)
    assert res.p99_ms == pytest.approx(1.2)
    assert res.errors == 3
    assert res.bytes_per_s == 4 * 1024 * 1024


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert capacity.pct(values, 50) == 50.0
    assert capacity.pct(values, 99) == 99.0
    assert capacity.pct([7.0], 99) == 7.0
    assert capacity.pct([], 50) != capacity.pct([], 50)  # NaN


def _cell(v: float) -> dict[str, float]:
    return {"median": v, "min": v, "max": v, "n": 1}


def _sweep(backdial_rps: dict[int, float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for c, rps in backdial_rps.items():
        summary[str(c)] = {
            "backdial": {
                "rps": _cell(rps),
                "proxy_cpu_us_per_req": _cell(15.0),
                "proxy_csw_per_req": _cell(0.3),
            },
            "nginx-keepalive": {
                "rps": _cell(30000.0),
                "proxy_cpu_us_per_req": _cell(16.0),
                "proxy_csw_per_req": _cell(0.25),
            },
            "haproxy": {
                "rps": _cell(29000.0),
                "proxy_cpu_us_per_req": _cell(17.0),
                "proxy_csw_per_req": _cell(0.2),
            },
        }
    return {"conns": list(backdial_rps), "targets": ["backdial"], "summary": summary}


def test_targets_judge_each_bar() -> None:
    result = {
        "sweep": _sweep({16: 31000.0, 64: 20000.0}),
        "slow_readers": [{"target": "backdial", "ratio": 0.95, "clients": 50, "body_kib": 8192}],
        "spike": [{"target": "backdial", "backend_max_concurrency": 17, "sessions": 16}],
        "slicing": [{"layout": "slices", "p99_change_pct": 12.0}],
    }
    verdicts = {what: met for what, _, met in report.targets(result)}
    assert verdicts["req/s ≥ 1.0× nginx-keepalive, c=16"] is True
    assert verdicts["req/s ≥ 1.0× haproxy, c=16"] is True
    assert verdicts["req/s ≥ 1.0× nginx-keepalive, c=64"] is False
    assert verdicts["proxy CPU/request ≤ nginx-keepalive's, c=16"] is True
    assert verdicts["context switches/request ≤ nginx-keepalive's, c=16"] is False
    assert verdicts["c=64 rate ≥ c=16 rate (16 sessions)"] is False
    assert verdicts["50 slow readers of 8 MiB: fast req/s ≥ 0.90× quiet"] is True
    assert verdicts["10× spike: backend concurrency ≤ declared sessions"] is False
    assert verdicts["slicing: protected p99 moves ≤ 10%"] is False


def test_render_embeds_the_plots_it_is_given() -> None:
    result = {
        "started": "20260101T000000",
        "environment": {
            "cpus": 2,
            "cpu_model": "x",
            "versions": dict.fromkeys(
                ("kernel", "nginx", "haproxy", "wrk", "python", "uvloop", "httptools"), "v"
            )
            | {"backdial_commit": "abc"},
        },
        "params": {"pin": "split", "duration": 5.0, "warmup": 1.0, "rounds": 3},
        "determinism": [
            {
                "sessions": 4,
                "service_ms": 20,
                "expected_rps": 200.0,
                "rps": 198.0,
                "error_pct": -1.0,
                "p99_ms": 41.0,
                "errors": 0,
            }
        ],
    }
    md = report.render(result, ["determinism.png"], "bench/", heading_level=2)
    assert "## Suite run 20260101T000000" in md
    assert "| 4 | 20 ms | 200 | 198 | -1.0% |" in md
    assert "![determinism](bench/determinism.png)" in md


def test_loadgen_reads_length_and_chunked_responses() -> None:
    async def go() -> list[tuple[int, bool]]:
        reader = asyncio.StreamReader()
        reader.feed_data(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        )
        return [await loadgen._response(reader), await loadgen._response(reader)]

    assert asyncio.run(go()) == [(200, False), (503, True)]
