# ruff: noqa: RUF001  (the multiplication sign is the ratio sign in the report)
"""The benchmark suite's pure parts: wrk parsing, percentiles, target verdicts, the report,
the idle-connection memory arithmetic and the proxies' connection counts.

The suite itself needs nginx, haproxy and wrk and a quiet machine, so it does not run
in CI; what decides its verdicts and renders its figures is tested here.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import time
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


capacity, harness, idle, loadgen, report = _import_bench(
    "capacity", "harness", "idle", "loadgen", "report"
)

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


def test_per_connection_divides_rss_growth_and_bounds_what_one_page_cannot_resolve() -> None:
    cell = idle.per_connection(10_000, 14_096, 1000, page=4096)  # 4,096 KiB grew
    assert cell == {"grew_bytes": 4096 * 1024, "bytes": 4096 * 1024 / 1000, "below": None}
    for after in (10_000, 10_003, 9_000):  # no growth, less than a page, shrunk
        flat = idle.per_connection(10_000, after, 1000, page=4096)
        assert flat["bytes"] is None
        assert flat["below"] == pytest.approx(4.096)
    with pytest.raises(ValueError):
        idle.per_connection(1, 2, 0)


def test_connection_count_fits_haproxys_two_descriptors_per_connection() -> None:
    assert idle.fit_connections(10_000, 65_536) == 10_000
    assert idle.fit_connections(10_000, 20_000) == 9_500  # 2 x (9,500 + slack) + 64 <= 20,000
    assert 2 * (idle.fit_connections(10_000, 20_000) + idle.SLACK) + 64 <= 20_000
    with pytest.raises(harness.BenchError):
        idle.fit_connections(10_000, 1024)


def test_proxy_connection_counts_are_parsed_from_each_proxys_own_status() -> None:
    stub = "Active connections: 10001 \nserver accepts handled requests\n 10001 10001 1 \n"
    assert idle.parse_stub_status(stub) == 10_000  # without the status request itself
    info = "Name: HAProxy\nMaxconn: 10256\nCurrConns: 9500\nCumConns: 9502\n"
    assert idle.parse_show_info(info) == 9500
    metrics = (
        "# TYPE backdial_sidecar_client_connections gauge\n"
        "backdial_sidecar_client_connections 9500.0\n"
        'backdial_sidecar_client_connections_total{worker="0"} 9601.0\n'
    )
    assert idle.metric_value(metrics, "backdial_sidecar_client_connections") == 9500.0
    for bad in (lambda: idle.parse_stub_status("nothing"), lambda: idle.parse_show_info("")):
        with pytest.raises(harness.BenchError):
            bad()
    with pytest.raises(harness.BenchError):
        idle.metric_value(metrics, "backdial_sidecar_client")


def test_kernel_memory_is_slab_plus_tcp_pages() -> None:
    meminfo = "MemTotal: 100 kB\nSlab:            2048 kB\nSReclaimable: 1 kB\n"
    sockstat = "sockets: used 5\nTCP: inuse 1 orphan 0 tw 3 alloc 2 mem 10\n"
    assert idle.kernel_kib(meminfo, sockstat, page=4096) == 2048 + 40


def test_heads_read_waits_for_the_server_side_to_take_the_bytes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            server_side, _ = srv.accept()
            with server_side:
                client.sendall(idle.PARTIAL_HEAD)
                deadline = time.monotonic() + 5
                while idle._unread_bytes(port) != (1, len(idle.PARTIAL_HEAD)):
                    assert time.monotonic() < deadline, idle._unread_bytes(port)
                    time.sleep(0.01)
                assert not idle.heads_read(port, 1)
                assert server_side.recv(4096) == idle.PARTIAL_HEAD
                assert idle.heads_read(port, 1)
                assert not idle.heads_read(port, 2)  # a connection missing is not "all read"


def _idle_row(target: str, before: int, idle_kib: int, head_kib: int) -> dict[str, Any]:
    n = 1000
    return {
        "target": target,
        "connections": n,
        "rss_before_kib": before,
        "idle": idle.per_connection(before, idle_kib, n, page=4096),
        "head": idle.per_connection(before, head_kib, n, page=4096),
        "head_extra": idle.per_connection(idle_kib, head_kib, n, page=4096),
        "kernel_bytes_per_connection": 7000.0,
    }


def test_idle_memory_table_gives_ratios_bounds_and_failures_never_a_silent_zero() -> None:
    result = {
        "idle_memory": {
            "connections": 1000,
            "requested": 10_000,
            "page_bytes": 4096,
            "partial_head": idle.PARTIAL_HEAD.decode(),
            "rows": [
                _idle_row("nginx-keepalive", 10_240, 10_740, 20_240),  # 512 B, 10,240 B
                _idle_row("backdial", 40_960, 41_216, 41_216),  # 262 B both
                _idle_row("haproxy", 10_240, 10_240, 15_240),  # idle below one page
                {"target": "backdial-python", "connections": 1000, "error": "only 900 counted"},
            ],
        }
    }
    md = "\n".join(report._memory(result, "#"))
    assert "1,000 connections (10,000 asked" in md
    assert "| nginx-keepalive | 10.0 | 512 | 1.00× | 10,240 | 1.00× | 9,728 | 7,000 |" in md
    below = "< 4.1 (below one page)"
    assert f"| backdial | 40.0 | 262 | 0.51× | 262 | 0.03× | {below} | 7,000 |" in md
    assert f"| haproxy | 10.0 | {below} | — | 5,120 | 0.50× | 5,120 | 7,000 |" in md
    assert "| backdial-python | not measured: only 900 counted |" in md
    assert "| 0 |" not in md
