#!/usr/bin/env python3
"""The whole benchmark suite in one command: JSON, Markdown and PNG plots.

    python3 bench/suite.py                 # ≈ 13 min; bench/results/<timestamp>/
    python3 bench/suite.py --publish       # ... and update docs/benchmarks.md + docs/bench/*.png
    python3 bench/suite.py --quick         # ≈ 4 min smoke run (short windows, one round)

Installs what it needs (Debian's wrk, nginx, haproxy; matplotlib), starts every
peer on 127.0.0.1 and measures, pinned (proxies + backend on CPU 0, load
generators on CPU 1):

1. req/s, p50/p99, CPU, context switches, TIME_WAIT and connects per request
   against concurrency 1..256 for direct, nginx-dialing, nginx-keepalive,
   haproxy and backdial (``run.measure``; c=16 and c=64 get ``--rounds``);
2. the seed's method: a new connection per request (``Connection: close``), c=16;
3. 10 MiB responses (MB/s) and 50 slow readers of 8 MiB each;
4. a 10x spike, determinism (S x T grid), slicing under contention;
5. memory: RSS per idle client connection (10,000, every peer on a fresh stack:
   ``idle.py``) and per session.

Every figure in the report is a ratio against a peer of the same run where one
applies; the report lists the targets of issue 11 with their measured status.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capacity
import idle
import resources
from harness import (
    BenchError,
    Stack,
    Workspace,
    ensure_tools,
    environment,
    log,
    raise_fd_limit,
    spread,
    start_backdial,
    start_backend,
    start_haproxy,
    start_nginx,
)
from report import render
from run import _clean, measure_stable, summarize

PEERS = [
    "direct",
    "nginx-dialing",
    "nginx-keepalive",
    "haproxy",
    "backdial",
    "backdial-python",
    "backdial-normal",
]
# In the sweep only: the default stack with --queued-cpu-policy normal, to show what the
# worker's batch policy while requests wait is worth (docs/engine.md).
SWEEP_ONLY = {"backdial-normal"}


def native_engine() -> str | None:
    """The installed native engine's version, or None (the sidecar then runs its Python
    engine and a separate ``backdial-python`` target would measure the same thing)."""
    try:
        return importlib.metadata.version("backdial-engine")
    except importlib.metadata.PackageNotFoundError:
        return None


REPO = Path(__file__).resolve().parent.parent
SHARED = {"sweep", "close", "bodies", "spike"}  # the parts measured on the long-lived stacks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per wrk run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="rounds at c=16 and c=64 (default 3)")
    p.add_argument("--conns", default="1,4,16,64,256", help="concurrency sweep")
    p.add_argument("--sessions", type=int, default=16, help="backdial sessions (default 16)")
    p.add_argument(
        "--only",
        default="",
        help="comma list of parts: sweep,close,bodies,spike,determinism,slicing,idle,memory,"
        "profile (idle: RSS per idle client connection, each peer on a fresh stack; memory: "
        "RSS per session)",
    )
    p.add_argument(
        "--idle-connections",
        type=int,
        default=0,
        help="client connections of the idle part (default 10,000; 2,000 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="short smoke run: 2 s windows, 1 round")
    p.add_argument("--pin", choices=["split", "none"], default="split")
    p.add_argument("--max-foreign", type=float, default=10.0)
    p.add_argument("--quiet-wait", type=float, default=10.0)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument(
        "--publish",
        action="store_true",
        help="copy the plots to docs/bench/ and replace the generated part of docs/benchmarks.md",
    )
    p.add_argument("--no-install", action="store_true", help="fail instead of installing tools")
    p.add_argument("--keep-tmp", action="store_true")
    ns = p.parse_args(argv)
    ns.conns = [int(c) for c in ns.conns.split(",") if c]
    parts = SHARED | {"determinism", "slicing", "idle", "memory", "profile"}
    ns.only = {x for x in ns.only.split(",") if x} or parts
    if ns.only - parts:
        p.error(f"unknown parts {sorted(ns.only - parts)}")
    if ns.idle_connections < 0:
        p.error("--idle-connections must be >= 0")
    ns.idle_connections = ns.idle_connections or (2000 if ns.quick else 10_000)
    if ns.quick:
        ns.duration, ns.warmup, ns.rounds = 2.0, 0.5, 1
    ns.threads, ns.settle, ns.repeat = 2, 0.3, ns.rounds
    return ns


def start_peers(
    ws: Workspace, stacks: dict[str, Stack], ns: argparse.Namespace, engine: str | None
) -> None:
    """The long-lived stacks the shared parts measure, beside the backend in *stacks*."""
    backend = stacks["direct"]
    stacks["nginx-dialing"] = start_nginx(ws, backend, False, ns.server_cpus)
    stacks["nginx-keepalive"] = start_nginx(ws, backend, True, ns.server_cpus)
    stacks["haproxy"] = start_haproxy(ws, backend, ns.server_cpus)
    stacks["backdial"] = start_backdial(ws, ns.server_cpus, ns.sessions)
    stacks["backdial"].note += (
        f", native engine {engine}" if engine else ", python engine (no native engine)"
    )
    capacity.wait_registered(stacks["backdial"], ns.sessions)
    if engine:  # the pure-Python fallback, measured beside it (docs/engine.md)
        stacks["backdial-python"] = start_backdial(
            ws, ns.server_cpus, ns.sessions, sidecar_args=["--engine", "python"],
            name="backdial-python",
        )  # fmt: skip
        stacks["backdial-python"].note += ", python engine (--engine python)"
        capacity.wait_registered(stacks["backdial-python"], ns.sessions)
        stacks["backdial-normal"] = start_backdial(
            ws, ns.server_cpus, ns.sessions, name="backdial-normal",
            sidecar_args=["--queued-cpu-policy", "normal"],
        )  # fmt: skip
        normal = f", native engine {engine}, --queued-cpu-policy normal (SCHED_OTHER always)"
        stacks["backdial-normal"].note += normal
        capacity.wait_registered(stacks["backdial-normal"], ns.sessions)


def sweep(stacks: dict[str, Stack], ns: argparse.Namespace) -> dict[str, Any]:
    targets = [t for t in PEERS if t in stacks]
    runs: list[dict[str, Any]] = []
    for rnd in range(ns.rounds):
        conns = ns.conns if rnd == 0 else [c for c in ns.conns if c in (16, 64)]
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for c in conns:
            for t in order:
                r = measure_stable(stacks[t], c, ns)
                r["round"] = rnd
                runs.append(r)
                log(
                    f"sweep r{rnd} c={c:<3} {t:<16} {r['rps']:>9,.0f} req/s  p99 "
                    f"{r['p99_ms']:.2f} ms  proxy {r['proxy_cpu_us_per_req']:.1f} µs  "
                    f"csw {r['proxy_csw_per_req']:.3f}"
                )
                time.sleep(ns.settle)
    return {
        "conns": ns.conns,
        "targets": targets,
        "runs": runs,
        "summary": summarize(runs, ns.conns, targets),
    }


def connection_per_request(
    stacks: dict[str, Stack], ns: argparse.Namespace, conns: int = 16
) -> dict[str, Any]:
    targets = [t for t in PEERS if t in stacks and t != "direct" and t not in SWEEP_ONLY]
    runs: list[dict[str, Any]] = []
    for rnd in range(ns.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for t in order:
            r = measure_stable(stacks[t], conns, ns, headers=["Connection: close"])
            r["round"] = rnd
            runs.append(r)
            cpu = r["proxy_cpu_us_per_req"]
            log(f"close r{rnd} {t:<16} {r['rps']:>9,.0f} req/s  proxy {cpu:.1f} µs")
            time.sleep(ns.settle)
    keys = ("rps", "p99_ms", "proxy_cpu_us_per_req", "proxy_csw_per_req", "tw_upstream_new")
    summary = {
        t: {k: spread([float(r[k]) for r in runs if r["target"] == t]) for k in keys}
        for t in targets
    }
    return {"conns": conns, "targets": targets, "runs": runs, "summary": summary}


def inproc_profile(ns: argparse.Namespace, clients: int) -> dict[str, Any]:
    """``bench/inproc.py``: the sidecar's Python cost per request and where it goes."""
    argv = [sys.executable, str(REPO / "bench" / "inproc.py"), "--json", "--clients", str(clients)]
    argv += ["--requests", "4000" if ns.quick else "20000", "--repeat", "3"]
    if ns.server_cpus is not None:
        argv = ["taskset", "-c", ns.server_cpus, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise BenchError(f"inproc.py failed: {proc.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(proc.stdout)
    log(f"in-process Python path, {clients} clients: {data['us_per_request']:.1f} µs per request")
    return data


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    try:
        ensure_tools(install=not ns.no_install)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    raise_fd_limit(65536)
    if ns.pin == "split" and (os.cpu_count() or 1) >= 2:
        ns.server_cpus, ns.wrk_cpus = "0", "1"
        os.sched_setaffinity(0, {1})
    else:
        ns.server_cpus = ns.wrk_cpus = None
    started = time.strftime("%Y%m%dT%H%M%S")
    out_dir = Path(ns.out) / started
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "started": started,
        "environment": environment(),
        "params": {
            k: (sorted(v) if isinstance(v, set) else v)
            for k, v in vars(ns).items()
            if k not in ("out",)
        },
    }
    ws = Workspace(keep=ns.keep_tmp)
    try:
        stacks: dict[str, Stack] = {}
        backend = start_backend(ws, ns.server_cpus)
        stacks["direct"] = backend
        engine = native_engine()
        if ns.only & SHARED:
            start_peers(ws, stacks, ns, engine)
        result["target_notes"] = {t: s.note for t, s in stacks.items()}
        if "sweep" in ns.only:
            result["sweep"] = sweep(stacks, ns)
        if "close" in ns.only:
            result["close"] = connection_per_request(stacks, ns)
        if "bodies" in ns.only:
            peers = {t: stacks[t] for t in ("direct", "nginx-keepalive", "haproxy", "backdial")}
            result["large_bodies"] = resources.large_bodies(peers, ns.wrk_cpus)
            result["slow_readers"] = [
                resources.slow_readers(stacks[t], ns.wrk_cpus, seconds=ns.duration)
                for t in ("nginx-keepalive", "backdial")
            ]
        if "spike" in ns.only:
            spike_stack = capacity.backdial_stack(
                ws, ns.server_cpus, "spike", ns.sessions, capacity.one_slice(ns.sessions, "1s")
            )
            seconds = 2.0 if ns.quick else 3.0
            result["spike"] = [
                capacity.spike(spike_stack, spike_stack.url, "", ns.sessions, ns.wrk_cpus, seconds),
                capacity.spike(
                    stacks["nginx-keepalive"],
                    backend.url,
                    backend.url,
                    ns.sessions,
                    ns.wrk_cpus,
                    seconds,
                ),
            ]
            result["spike"][0]["target"] = "backdial"
            capacity.stop_stack(ws, spike_stack)
        for name in (t for t in PEERS if t != "direct"):  # the backend stays up
            if name in stacks:
                capacity.stop_stack(ws, stacks[name])  # the rest start their own stacks
        if "idle" in ns.only:
            targets = [t for t in idle.TARGETS if engine or t != "backdial-python"]
            result["idle_memory"] = idle.idle_connections(
                ws, backend, targets, ns.server_cpus, ns.idle_connections, ns.sessions
            )
        if "determinism" in ns.only:
            result["determinism"] = capacity.determinism(
                ws,
                ns.server_cpus,
                ns.wrk_cpus,
                service_ms=(20, 100) if ns.quick else (5, 20, 100),
                seconds=2.0 if ns.quick else 4.0,
            )
        if "slicing" in ns.only:
            result["slicing"] = capacity.slicing(ws, ns.server_cpus, ns.wrk_cpus)
        if "memory" in ns.only:
            result["sessions_memory"] = resources.session_memory(
                ws, ns.server_cpus, ns.wrk_cpus, large=256 if ns.quick else 1024
            )
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        ws.stop_all()
    if "profile" in ns.only:
        result["profile"] = [inproc_profile(ns, clients) for clients in (16, 64)]
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    import plots

    images = plots.draw_all(result, out_dir)
    (out_dir / "results.json").write_text(
        json.dumps(_clean(result), indent=1, allow_nan=False) + "\n"
    )
    md = render(result, [p.name for p in images], "")
    (out_dir / "report.md").write_text(md)
    log(
        f"wrote {out_dir}/results.json, report.md and {len(images)} plots in {result['elapsed_s']}s"
    )
    if ns.publish:
        publish(out_dir, result, images)
    return 0


BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


def publish(out_dir: Path, result: dict[str, Any], images: list[Path]) -> None:
    """Plots to docs/bench/, the generated report between the markers of docs/benchmarks.md."""
    img_dir = REPO / "docs" / "bench"
    img_dir.mkdir(exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    for img in images:
        shutil.copy2(img, img_dir / img.name)
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text()
    body = render(result, [p.name for p in images], "bench/", heading_level=2)
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    log(f"updated {doc} and {img_dir} from {out_dir.name}")


if __name__ == "__main__":
    sys.exit(main())
