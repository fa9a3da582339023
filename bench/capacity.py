"""Scenarios about sessions as capacity: the 10x spike, determinism, slicing under contention.

* **spike**: a steady load at half the declared capacity, then ten times that
  load for a few seconds, then steady again.  Recorded per request (``loadgen``)
  and, every 50 ms, the sessions carrying a request (sidecar ``/v1/state``
  ``busy``, i.e. the backend's concurrency); at the end the backend's own
  ``max_concurrency``.  The same load against nginx-keepalive shows what an
  uncapped proxy lets through.
* **determinism**: saturated closed-loop load (``wrk -c 2S``) on ``/delay?ms=T``
  for S sessions; the measured rate against ``S / T`` with the error in %.
* **slicing**: a protected slice (header ``X-Class: api``, 4 clients, 5 ms) alone
  and while a bulk slice floods (200 clients, 50 ms); its p99 should move by at
  most 10 %.  The flood runs alone first for longer than ``leaseIdleRelease``, so
  the protected slice's sticky leases idle out and the bulk slice (which may
  borrow) holds every session: the protected class must get its quota back from a
  borrower under load.  The same with one slice for everyone shows what slicing
  buys.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    HOST,
    WRK,
    BenchError,
    Stack,
    Workspace,
    http_get,
    log,
    parse_wrk,
    start_backdial,
    wrk,
)
from loadgen import Phase


def write_policy(ws: Workspace, name: str, slices: list[dict[str, Any]]) -> Path:
    """An acceptor config file (JSON) with these slices."""
    path = ws.path(f"{name}.json")
    path.write_text(json.dumps({"version": 1, "slices": slices}))
    return path


def one_slice(max_waiting: int, timeout: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "default",
            "share": 100,
            "queue": {"maxWaiting": max_waiting, "timeout": timeout},
        }
    ]


def wait_registered(stack: Stack, sessions: int, timeout: float = 60.0) -> None:
    """Until the acceptor counts *sessions* registered sessions."""
    admin = stack.extra["acceptor_admin"]
    end = time.monotonic() + timeout
    got = 0
    while time.monotonic() < end:
        status, body = http_get(admin + "/v1/state", timeout=5)
        if status == 200:
            state = json.loads(body)
            got = sum(int(s["registered"]) for s in state["services"].values())
            if got >= sessions:
                return
        time.sleep(0.2)
    raise BenchError(f"{stack.name}: {got} of {sessions} sessions registered after {timeout}s")


def backdial_stack(
    ws: Workspace, cpus: str | None, name: str, sessions: int, slices: list[dict[str, Any]]
) -> Stack:
    stack = start_backdial(ws, cpus, sessions, 1, name=name, config=write_policy(ws, name, slices))
    wait_registered(stack, sessions)
    return stack


def stop_stack(ws: Workspace, stack: Stack) -> None:
    stack.stop()
    if stack in ws.stacks:
        ws.stacks.remove(stack)


def run_loadgen(
    port: int, phases: Sequence[Phase], cpus: str | None, timeout: float
) -> tuple[float, list[tuple[float, float, int, str]]]:
    """(wall-clock time the load's clock starts at, records (start, latency, status, label))."""
    spec = json.dumps({"host": HOST, "port": port, "phases": [asdict(p) for p in phases]})
    argv = [sys.executable, str(Path(__file__).resolve().parent / "loadgen.py"), spec]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchError(f"loadgen failed: {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout)
    records = [(float(a), float(b), int(c), str(d)) for a, b, c, d in data["records"]]
    return float(data["t0_wall"]), records


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


# ---------------------------------------------------------------- spike


class BusySampler:
    """Samples the backend's concurrency every *period* seconds (wall-clock stamped).

    backdial: the sidecar's busy sessions (``/v1/state``; one request per session);
    a peer proxy: the backend's own ``in_flight`` (``/stats``, minus that request)."""

    def __init__(self, stack: Stack, backend_url: str, period: float = 0.05) -> None:
        admin = stack.extra.get("sidecar_admin")
        self.url = admin + "/v1/state" if admin else backend_url + "stats"
        self.key, self.minus = ("busy", 0) if admin else ("in_flight", 1)
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = http_get(self.url, timeout=2)
            if status == 200:
                value = int(json.loads(body)[self.key]) - self.minus
                self.samples.append((time.time(), value))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def backend_stats(url: str) -> dict[str, int]:
    status, body = http_get(url + "stats", timeout=5)
    if status != 200:
        raise BenchError(f"GET {url}stats: {status}")
    stats: dict[str, int] = json.loads(body)
    return stats


def reset_backend(url: str) -> None:
    import urllib.request

    req = urllib.request.Request(url + "stats/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


def spike(
    stack: Stack,
    stats_url: str,
    backend_url: str,
    sessions: int,
    wrk_cpus: str | None,
    seconds: float = 3.0,
) -> dict[str, Any]:
    """Steady at half capacity, then 10x for *seconds*, then steady again.

    *stats_url* reaches the backend's ``/stats`` through the proxy (backdial: the service
    has no port of its own), *backend_url* directly (peers: sampled during the run)."""
    service_ms = 20
    per_client = 1 / (service_ms / 1000)  # each client: one request per service time
    steady = max(1, round(sessions / 2))  # half the declared capacity
    t_spike, t_end = seconds, 3 * seconds
    path = f"/delay?ms={service_ms}"
    phases = [
        Phase(steady, 0.0, t_end, 1 / per_client, path, label="base"),
        Phase(9 * steady, t_spike, 2 * seconds, 1 / per_client, path, label="spike"),
    ]
    wrk(stack.url_for(path), sessions, 1.0, 1, wrk_cpus)  # warm: every session leased/pooled
    reset_backend(stats_url)
    sampler = BusySampler(stack, backend_url)
    sampler.start()
    try:
        t0_wall, records = run_loadgen(stack.port, phases, wrk_cpus, timeout=t_end + 60)
    finally:
        sampler.stop()
    busy = [(round(t - t0_wall, 3), b) for t, b in sampler.samples if t - t0_wall >= -0.5]
    # a peer's backend also counted the sampler's own /stats requests
    top = backend_stats(stats_url)["max_concurrency"] - sampler.minus
    log(f"spike via {stack.name}: backend max concurrency {top} (declared {sessions})")
    in_spike = [r for r in records if t_spike <= r[0] < 2 * seconds]
    steady_rs = [r for r in records if r[0] < t_spike - 0.2 or r[0] >= 2 * seconds + 0.5]
    ok_steady = [r[1] * 1e3 for r in steady_rs if r[2] == 200]
    ok_spike = [r[1] * 1e3 for r in in_spike if r[2] == 200]
    rejected = [r[1] * 1e3 for r in records if r[2] == 503]
    other = [r for r in records if r[2] not in (200, 503)]
    bins: dict[int, list[int]] = {}
    for start, _lat, status, _ in records:
        b = bins.setdefault(int(start * 10), [0, 0])
        b[0 if status == 200 else 1] += 1
    return {
        "target": stack.name,
        "sessions": sessions,
        "service_ms": service_ms,
        "steady_clients": steady,
        "spike_clients": 10 * steady,
        "offered_steady_rps": steady * per_client,
        "offered_spike_rps": 10 * steady * per_client,
        "capacity_rps": sessions * per_client,
        "requests": len(records),
        "backend_max_concurrency": top,
        "busy_max_sampled": max((b for _, b in sampler.samples), default=None) if sampler else None,
        "steady_p50_ms": pct(ok_steady, 50),
        "steady_p99_ms": pct(ok_steady, 99),
        "spike_admitted_p50_ms": pct(ok_spike, 50),
        "spike_admitted_p99_ms": pct(ok_spike, 99),
        "spike_admitted": len(ok_spike),
        "rejected_503": len(rejected),
        "rejected_p50_ms": pct(rejected, 50),
        "rejected_p99_ms": pct(rejected, 99),
        "other_status": len(other),
        "series": {
            "t": [k / 10 for k in sorted(bins)],
            "ok_per_s": [bins[k][0] * 10 for k in sorted(bins)],
            "rejected_per_s": [bins[k][1] * 10 for k in sorted(bins)],
            "busy": [list(s) for s in busy],
        },
        "window": {"spike_start": t_spike, "spike_end": 2 * seconds, "end": t_end},
    }


# ---------------------------------------------------------------- determinism


def determinism(
    ws: Workspace,
    server_cpus: str | None,
    wrk_cpus: str | None,
    sessions: Sequence[int] = (4, 16, 64),
    service_ms: Sequence[int] = (5, 20, 100),
    seconds: float = 4.0,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in sessions:
        stack = backdial_stack(ws, server_cpus, f"det-s{s}", s, one_slice(10_000, "30s"))
        try:
            for t in service_ms:
                url = stack.url_for(f"/delay?ms={t}")
                conns = max(8, 2 * s)
                wrk(url, conns, 1.0, 2, wrk_cpus)  # warm-up: leases settle
                # The rate is read from the sidecar's answered-requests counter over a window
                # inside a longer wrk run: wrk's own count has an edge error of up to one
                # service time per session at each end.
                window = max(seconds, 40 * t / 1000)
                load = _background_wrk(url, conns, window + 2.0, wrk_cpus)
                try:
                    time.sleep(1.0)
                    n0, t0 = answered(stack), time.monotonic()
                    time.sleep(window)
                    n1, t1 = answered(stack), time.monotonic()
                    res = parse_wrk(load.communicate(timeout=window + 30)[0])
                finally:
                    if load.poll() is None:
                        load.kill()
                        load.wait()
                rate = (n1 - n0) / (t1 - t0)
                expected = s / (t / 1000)
                row = {
                    "sessions": s,
                    "service_ms": t,
                    "conns": conns,
                    "window_s": round(t1 - t0, 3),
                    "expected_rps": expected,
                    "rps": rate,
                    "wrk_rps": res.rps,
                    "error_pct": (rate - expected) / expected * 100,
                    "p50_ms": res.p50_ms,
                    "p99_ms": res.p99_ms,
                    "errors": res.errors,
                }
                log(
                    f"determinism S={s} T={t}ms: {rate:,.0f} req/s vs {expected:,.0f} "
                    f"({row['error_pct']:+.1f}%), errors {res.errors}"
                )
                out.append(row)
        finally:
            stop_stack(ws, stack)
    return out


def answered(stack: Stack) -> float:
    """Requests the sidecar answered with 200 so far (its /metrics counter)."""
    status, body = http_get(stack.extra["sidecar_admin"] + "/metrics", timeout=5)
    if status != 200:
        raise BenchError(f"{stack.name}: sidecar /metrics answered {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("backdial_sidecar_requests_total{") and 'code="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _background_wrk(
    url: str, conns: int, seconds: float, cpus: str | None, extra: Sequence[str] = ()
) -> subprocess.Popen[str]:
    argv = [WRK, "-t1", f"-c{conns}", f"-d{round(seconds)}s", "--latency", "--timeout", "15s"]
    argv += [*extra, url]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- slicing


PROTECTED = [
    {
        "name": "protected",
        "match": {"headers": {"x-class": "^api$"}},
        "share": 50,
        "borrow": True,
        "queue": {"maxWaiting": 1000, "timeout": "10s"},
    },
    {"name": "bulk", "share": 50, "borrow": True, "queue": {"maxWaiting": 1000, "timeout": "10s"}},
]


# The flood runs alone this long before the protected load: leaseIdleRelease (2 s by
# default) plus the worker's idle sweep period (1 s) plus a margin, so the protected
# slice's leases are back at the acceptor and borrowed by the flood when it returns.
IDLE_OUT = 3.5


def slice_leases(stack: Stack) -> dict[str, int]:
    """Sessions leased per slice now (the acceptor's count, every service summed)."""
    status, body = http_get(stack.extra["acceptor_admin"] + "/v1/state", timeout=5)
    if status != 200:
        raise BenchError(f"{stack.name}: acceptor /v1/state answered {status}")
    out: dict[str, int] = {}
    for service in json.loads(body)["services"].values():
        for name, sl in service["slices"].items():
            out[name] = out.get(name, 0) + int(sl["leased"])
    return out


def queue_waits(stack: Stack, slice_name: str) -> tuple[float, float]:
    """(requests that waited for a session, seconds they waited in all) in *slice_name* so
    far: the acceptor's ``backdial_queue_wait_seconds``, from the workers' 1 s STATS."""
    status, body = http_get(stack.extra["acceptor_admin"] + "/metrics", timeout=5)
    if status != 200:
        raise BenchError(f"{stack.name}: acceptor /metrics answered {status}")
    count = total = 0.0
    label = f'{{slice="{slice_name}"}}'
    for line in body.decode().splitlines():
        if line.startswith("backdial_queue_wait_seconds_count" + label):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("backdial_queue_wait_seconds_sum" + label):
            total = float(line.rsplit(" ", 1)[1])
    return count, total


def slicing(
    ws: Workspace,
    server_cpus: str | None,
    wrk_cpus: str | None,
    sessions: int = 16,
    seconds: float = 5.0,
) -> list[dict[str, Any]]:
    """Protected p99 alone vs under a bulk flood, with slices and with one shared slice."""
    out: list[dict[str, Any]] = []
    layouts = [("slices", PROTECTED), ("one-slice", one_slice(1000, "10s"))]
    for label, slices in layouts:
        stack = backdial_stack(ws, server_cpus, f"slice-{label}", sessions, slices)
        try:
            protected = stack.url_for("/delay?ms=5")
            header = ["X-Class: api"]
            wrk(protected, 4, 1.0, 1, wrk_cpus, header)
            alone = wrk(protected, 4, seconds, 1, wrk_cpus, header)
            flood = _background_wrk(
                stack.url_for("/delay?ms=50"), 200, seconds + IDLE_OUT + 2, wrk_cpus
            )
            try:
                time.sleep(IDLE_OUT)  # the flood fills every queue; protected leases idle out
                leases = slice_leases(stack)
                first = queue_waits(stack, "protected")
                loaded = wrk(protected, 4, seconds, 1, wrk_cpus, header)
                time.sleep(1.2)  # the flood goes on; the worker's next STATS carries the waits
                last = queue_waits(stack, "protected")
                waits = last[0] - first[0]
                flood_out, _ = flood.communicate(timeout=seconds + 30)
            finally:
                if flood.poll() is None:
                    flood.kill()
                    flood.wait()
            bulk = parse_wrk(flood_out)
            row = {
                "layout": label,
                "protected_alone_p50_ms": alone.p50_ms,
                "protected_alone_p99_ms": alone.p99_ms,
                "protected_flood_p50_ms": loaded.p50_ms,
                "protected_flood_p99_ms": loaded.p99_ms,
                "p99_change_pct": (loaded.p99_ms - alone.p99_ms) / alone.p99_ms * 100,
                "protected_rps_alone": alone.rps,
                "protected_rps_flood": loaded.rps,
                "protected_errors": alone.errors + loaded.errors,
                "bulk_rps": bulk.rps,
                "bulk_errors": bulk.errors,
                "leased_when_protected_returns": leases,
                # Protected requests that waited for a session under the flood (the rest
                # of their latency is the shared CPU), and their mean wait; one-slice
                # counts everyone's waits together, so there it is not recorded.
                "protected_waits_flood": waits if label == "slices" else None,
                "protected_wait_mean_ms": (
                    (last[1] - first[1]) / waits * 1e3 if waits and label == "slices" else None
                ),
            }
            waited = (
                f"; {waits:.0f} protected requests waited for a session "
                f"(mean {row['protected_wait_mean_ms'] or 0:.1f} ms)"
                if label == "slices"
                else ""
            )
            log(
                f"slicing {label}: protected p99 {alone.p99_ms:.2f} -> {loaded.p99_ms:.2f} ms "
                f"({row['p99_change_pct']:+.1f}%), {alone.rps:,.0f} -> {loaded.rps:,.0f} req/s; "
                f"bulk {bulk.rps:,.0f} req/s; leased when it returned {leases}{waited}"
            )
            out.append(row)
        finally:
            stop_stack(ws, stack)
    return out
