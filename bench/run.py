#!/usr/bin/env python3
"""backdial vs nginx (dialing, keepalive) and haproxy on loopback, in one run.

    python3 bench/run.py --duration 10 --repeat 3

Starts the demo app served conventionally (the backend every peer proxy
dials), nginx dialing per request, nginx with an upstream keepalive pool,
haproxy with ``http-reuse always``, and backdial (acceptor + one sidecar worker
+ the demo service registering 16 sessions).  Then, for each round, each
concurrency and each target (the order rotates every round), it runs a wrk
warm-up and a measured wrk run of ``GET /`` and records:

* req/s, latency p50/p99, errors (socket errors + non-2xx);
* CPU seconds and context switches of the proxy processes and of the
  backend, from /proc/<pid>/stat and /proc/<pid>/task/*/status, over the
  measured window, hence CPU and context switches per request;
* TIME_WAIT sockets created during the window, split by hop (client side,
  proxy-to-backend side), and TCP connects per request (/proc/net/snmp);
* CPU used by wrk and by anything else on the machine (noise indicator).

Results go to ``bench/results/<timestamp>.json`` and a Markdown report next to
it (also printed), where every figure is given with its ratio against
nginx-keepalive and nginx-dialing of the same run.  ``--profile`` then samples
the sidecar with py-spy under load and adds the top functions to the report.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    WRK,
    ZERO,
    BenchError,
    Stack,
    Usage,
    Workspace,
    classify_time_wait,
    control_records,
    cpu_delta,
    environment,
    log,
    parse_wrk,
    spread,
    start_backdial,
    start_backend,
    start_haproxy,
    start_nginx,
    system_cpu,
    tcp_opens,
    time_wait_sockets,
    usage_many,
    wait_quiet,
    wrk,
)
from report import environment_line

ALL_TARGETS = ["direct", "nginx-dialing", "nginx-keepalive", "haproxy", "backdial"]
BASELINES = ("nginx-keepalive", "nginx-dialing")
# below these baseline values a ratio says nothing (noise over ~zero): shown as "-"
RATIO_FLOOR = {
    "connects_per_req": 0.01,
    "tw_upstream_new": 10.0,
    "errors": 0.5,
    # wrk's own closes and the noise indicators: a ratio would mean nothing
    "tw_client_new": float("inf"),
    "foreign_cpu_pct": float("inf"),
    "foreign_client_cpu_pct": float("inf"),
    "wrk_cpu_pct": float("inf"),
    "tw_machine_after": float("inf"),
}
SHORT = {"nginx-keepalive": "ka", "nginx-dialing": "dial"}

# (key, label, digits, better) -- better: "high", "low" or "" (informational)
METRICS: list[tuple[str, str, int, str]] = [
    ("rps", "req/s", 0, "high"),
    (
        "rps_per_core",
        "req/s per core of CPU: requests / (proxy + backend + irq CPU seconds)",
        0,
        "high",
    ),
    ("p50_ms", "latency p50 (ms)", 3, "low"),
    ("p99_ms", "latency p99 (ms)", 3, "low"),
    ("proxy_cpu_us_per_req", "proxy CPU per request (µs)", 1, "low"),
    ("backend_cpu_us_per_req", "backend CPU per request (µs)", 1, "low"),
    ("total_cpu_us_per_req", "proxy+backend CPU per request (µs)", 1, "low"),
    ("proxy_csw_per_req", "proxy context switches per request", 3, "low"),
    ("total_csw_per_req", "proxy+backend context switches per request", 3, "low"),
    ("softirq_us_per_req", "irq+softirq CPU per request on the servers' core (µs)", 1, "low"),
    ("connects_per_req", "TCP connects per request (machine-wide)", 3, "low"),
    (
        "control_records_per_req",
        "backdial control records (sidecar<->acceptor) per request",
        4,
        "low",
    ),
    ("tw_upstream_new", "new TIME_WAIT sockets, proxy<->backend hop", 0, "low"),
    ("tw_client_new", "new TIME_WAIT sockets, client<->proxy hop", 0, "low"),
    (
        "tw_machine_after",
        "TIME_WAIT sockets on the machine after the run (`ss -tan state "
        "time-wait`; includes the previous minute's runs)",
        0,
        "",
    ),
    ("errors", "errors (socket + non-2xx)", 0, "low"),
    ("foreign_cpu_pct", "CPU used by other processes on the servers' core (% of 1 core)", 1, ""),
    ("foreign_client_cpu_pct", "CPU used by other processes on wrk's core (% of 1 core)", 1, ""),
    ("wrk_cpu_pct", "wrk CPU (% of 1 core)", 1, ""),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="rounds, interleaved (default 3)")
    p.add_argument("--conns", default="16,64", help="wrk connections, comma list (default 16,64)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma list out of {','.join(ALL_TARGETS)} (default all); also "
        "backdial-sN (N sessions) and backdial-wN (N sidecar workers) as "
        "extra, diagnostic targets",
    )
    p.add_argument(
        "--pin",
        choices=["split", "none"],
        default="split",
        help="split: proxies+backends on CPU 0, wrk on CPU 1 (default); none: no pinning",
    )
    p.add_argument("--sessions", type=int, default=16, help="backdial sessions (default 16)")
    p.add_argument("--workers", type=int, default=1, help="sidecar workers (default 1)")
    p.add_argument(
        "--settle", type=float, default=1.0, help="pause between measurements, seconds (default 1)"
    )
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="directory for <timestamp>.json/.md (default bench/results)",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=10.0,
        help="re-run a measurement when other processes used more than this %% of "
        "a core on the servers' or wrk's core (default 10)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measurement, wait up to this many seconds for a second "
        "in which other processes use less than --max-foreign (default 20)",
    )
    p.add_argument(
        "--retries", type=int, default=2, help="re-runs per disturbed measurement (default 2)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, sample the sidecar with py-spy under wrk load",
    )
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument(
        "--profile-conns",
        default="16,64",
        help="wrk connections while profiling, comma list (default 16,64)",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native (C frames of uvloop/httptools too)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ns = p.parse_args(argv)
    ns.conns = [int(c) for c in ns.conns.split(",") if c]
    ns.profile_conns = [int(c) for c in ns.profile_conns.split(",") if c]
    ns.targets = [t for t in ns.targets.split(",") if t]
    unknown = {
        t for t in ns.targets if t not in ALL_TARGETS and not re.fullmatch(r"backdial-[sw]\d+", t)
    }
    if unknown:
        p.error(f"unknown targets: {sorted(unknown)}")
    if ns.duration <= 0 or ns.duration > 600 or ns.repeat < 1 or ns.repeat > 50:
        p.error("--duration must be in (0, 600] and --repeat in [1, 50]")
    return ns


# ---------------------------------------------------------------- measuring


def _group_usage(
    stack_procs: list[Any], before: dict[int, Usage], after: dict[int, Usage]
) -> tuple[Usage, dict[str, dict[str, float]]]:
    total = ZERO
    parts: dict[str, dict[str, float]] = {}
    for proc in stack_procs:
        u = ZERO
        for pid in proc.pids():
            if pid in before and pid in after:
                u = u + (after[pid] - before[pid])
        total = total + u
        parts[proc.name] = {"cpu_s": round(u.cpu, 3), "vcsw": u.vcsw, "ivcsw": u.ivcsw}
    return total, parts


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(
    stack: Stack,
    conns: int,
    ns: argparse.Namespace,
    after_warmup: Callable[[], None] | None = None,
    headers: Sequence[str] = (),
) -> dict[str, Any]:
    """One warm-up + measured wrk run against ``stack``; ``ns`` carries the settings.

    *headers* go on every request (``Connection: close``: a new connection per request)."""
    wrk_cpus: str | None = ns.wrk_cpus
    server_cpus: str | None = ns.server_cpus
    stack.check_alive()
    quiet_wait = wait_quiet(ns.quiet_wait, ns.max_foreign, window=0.5) if ns.quiet_wait > 0 else 0.0
    if ns.warmup > 0:
        wrk(stack.url, conns, ns.warmup, ns.threads, wrk_cpus, headers)
    if after_warmup is not None:
        after_warmup()
    time.sleep(0.3)
    proxy_pids, backend_pids = stack.proxy_pids(), stack.backend_pids()
    tw_before = time_wait_sockets()
    acc_admin = stack.extra.get("acceptor_admin")
    ctl0 = control_records(acc_admin) if acc_admin else {}
    opens0 = tcp_opens()
    u0 = usage_many([*proxy_pids, *backend_pids])
    busy0, kids0, self0, t0 = system_cpu(), _children_cpu(), _self_cpu(), time.monotonic()
    res = wrk(stack.url, conns, ns.duration, ns.threads, wrk_cpus, headers)
    t1, self1, kids1, busy1 = time.monotonic(), _self_cpu(), _children_cpu(), system_cpu()
    u1 = usage_many([*proxy_pids, *backend_pids])
    opens1 = tcp_opens()
    ctl1 = control_records(acc_admin) if acc_admin else {}
    ctl = {k: v - ctl0.get(k, 0.0) for k, v in ctl1.items() if v - ctl0.get(k, 0.0)}
    time.sleep(0.3)  # let the last closes land in TIME_WAIT
    tw_after = time_wait_sockets()
    stack.check_alive()

    proxy, proxy_parts = _group_usage(stack.proxy, u0, u1)
    backend, backend_parts = _group_usage(stack.backend, u0, u1)
    window = t1 - t0
    wrk_cpu = kids1 - kids0
    cpu = cpu_delta(busy1, busy0)
    # Pinned, what else ran on the servers' core competes with them. irq/softirq time (the
    # loopback receive path, run for whichever process sent) is shown on its own.
    own = self1 - self0  # this harness (and slow_clients' reader thread)
    if server_cpus is not None and wrk_cpus is not None and server_cpus in cpu:
        core, client = cpu[server_cpus], cpu[wrk_cpus]
        foreign = max(0.0, core["busy"] - core["irq_total"] - proxy.cpu - backend.cpu)
        foreign_client = max(0.0, client["busy"] - client["irq_total"] - wrk_cpu - own)
    else:
        core = cpu["all"]
        foreign = foreign_client = max(
            0.0, core["busy"] - core["irq_total"] - proxy.cpu - backend.cpu - wrk_cpu - own
        )
    softirq = core["irq_total"]
    tw = classify_time_wait(tw_after - tw_before, stack.port, stack.upstream_port)
    n = max(1, res.requests)
    return {
        "target": stack.name,
        "conns": conns,
        "wrk": res.as_dict(),
        "window_s": round(window, 3),
        "quiet_wait_s": round(quiet_wait, 1),
        "proxy": {
            "cpu_s": round(proxy.cpu, 3),
            "vcsw": proxy.vcsw,
            "ivcsw": proxy.ivcsw,
            "processes": proxy_parts,
        },
        "backend": {
            "cpu_s": round(backend.cpu, 3),
            "vcsw": backend.vcsw,
            "ivcsw": backend.ivcsw,
            "processes": backend_parts,
        },
        "wrk_cpu_s": round(wrk_cpu, 3),
        "cpu_s_by_cpu": cpu,
        "time_wait_new": tw,
        "time_wait_machine_total_after": len(tw_after),
        "tcp_connects": opens1 - opens0,
        "control_records": ctl,
        # derived, per request
        "rps": res.rps,
        "p50_ms": res.p50_ms,
        "p99_ms": res.p99_ms,
        "errors": res.errors,
        "proxy_cpu_us_per_req": proxy.cpu / n * 1e6 if stack.proxy else float("nan"),
        "backend_cpu_us_per_req": backend.cpu / n * 1e6,
        "total_cpu_us_per_req": (proxy.cpu + backend.cpu) / n * 1e6,
        "proxy_csw_per_req": proxy.csw / n if stack.proxy else float("nan"),
        "total_csw_per_req": (proxy.csw + backend.csw) / n,
        "connects_per_req": (opens1 - opens0) / n,
        "control_records_per_req": sum(ctl.values()) / n if acc_admin else float("nan"),
        "tw_upstream_new": tw["upstream_side"],
        "tw_client_new": tw["client_side"],
        "tw_machine_after": len(tw_after),
        "foreign_cpu_pct": foreign / window * 100,
        "foreign_client_cpu_pct": foreign_client / window * 100,
        "harness_cpu_s": round(own, 3),
        "softirq_us_per_req": softirq / n * 1e6,
        # what one fully used core would serve at this CPU cost: robust against noise
        "rps_per_core": n / (proxy.cpu + backend.cpu + softirq)
        if (proxy.cpu + backend.cpu + softirq) > 0
        else float("nan"),
        "wrk_cpu_pct": wrk_cpu / window * 100,
    }


def _noise(r: dict[str, Any]) -> float:
    return max(float(r["foreign_cpu_pct"]), float(r["foreign_client_cpu_pct"]))


def measure_stable(
    stack: Stack,
    conns: int,
    ns: argparse.Namespace,
    after_warmup: Callable[[], None] | None = None,
    headers: Sequence[str] = (),
) -> dict[str, Any]:
    """``measure``, repeated (up to ``ns.retries`` more times) while other processes on the
    machine took more than ``ns.max_foreign`` % of a core on the servers' or wrk's core.
    Keeps the least disturbed attempt; the others stay in the record, summarized."""
    attempts: list[dict[str, Any]] = []
    while True:
        r = measure(stack, conns, ns, after_warmup, headers)
        attempts.append(r)
        if _noise(r) <= ns.max_foreign or len(attempts) > ns.retries:
            break
        log(
            f"  {stack.name} c={conns}: {r['rps']:,.0f} req/s set aside, other processes used "
            f"{_noise(r):.0f}% of a core; again"
        )
        time.sleep(ns.settle * 2)
    best = min(attempts, key=_noise)
    best["disturbed"] = _noise(best) > ns.max_foreign
    best["other_attempts"] = [
        {
            "rps": a["rps"],
            "foreign_cpu_pct": a["foreign_cpu_pct"],
            "foreign_client_cpu_pct": a["foreign_client_cpu_pct"],
        }
        for a in attempts
        if a is not best
    ]
    return best


# ---------------------------------------------------------------- summary + report


def summarize(runs: list[dict[str, Any]], conns: list[int], targets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in conns:
        per_target: dict[str, Any] = {}
        for t in targets:
            rows = [r for r in runs if r["target"] == t and r["conns"] == c]
            per_target[t] = {key: spread([float(r[key]) for r in rows]) for key, *_ in METRICS}
        for t in targets:
            ratios: dict[str, Any] = {}
            for base in BASELINES:
                if base not in per_target:
                    continue
                ratios[base] = {}
                for key, *_ in METRICS:
                    num = per_target[t][key]["median"]
                    den = per_target[base][key]["median"]
                    floor = RATIO_FLOOR.get(key, 0.0)
                    ok = den == den and abs(den) > floor and num == num
                    ratios[base][key] = num / den if ok else None
                # paired per-round req/s ratio (same round, adjacent in time)
                paired = []
                for r in (x for x in runs if x["target"] == t and x["conns"] == c):
                    for b in runs:
                        if b["target"] == base and b["conns"] == c and b["round"] == r["round"]:
                            paired.append(r["rps"] / b["rps"] if b["rps"] else float("nan"))
                ratios[base]["rps_paired"] = spread(paired)
            per_target[t]["ratios"] = ratios
        out[str(c)] = per_target
    return out


def _fmt(value: float | None, digits: int) -> str:
    if value is None or value != value:
        return "—"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.2f}x"


def render(result: dict[str, Any]) -> str:
    params = result["params"]
    lines = [
        f"# backdial benchmark {result['started']}",
        "",
        environment_line(result["environment"]),
        "",
        f"wrk -t{params['threads']} GET /, {params['duration']}s measured after "
        f"{params['warmup']}s warm-up, {params['repeat']} interleaved rounds; "
        f"pinning: {params['pin_note']}. Cells: median (min-max over rounds); "
        "xka / xdial: ratio of medians against nginx-keepalive / nginx-dialing of this run.",
        "",
    ]
    for note in result["notes"]:
        lines.append(f"* {note}")
    lines.append("")
    summary = result["summary"]
    targets = params["targets"]
    for key, label, digits, better in METRICS:
        hint = {"high": " — higher is better", "low": " — lower is better"}.get(better, "")
        lines += [f"### {label}{hint}", ""]
        head = ["target"]
        for c in params["conns"]:
            head += [f"c={c}", "xka", "xdial"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for t in targets:
            row = [t]
            for c in params["conns"]:
                s = summary[str(c)][t][key]
                cell = _fmt(s["median"], digits)
                if s["n"] > 1 and s["min"] != s["max"]:
                    cell += f" ({_fmt(s['min'], digits)}-{_fmt(s['max'], digits)})"
                ratios = summary[str(c)][t]["ratios"]
                row += [
                    cell,
                    _ratio(ratios.get("nginx-keepalive", {}).get(key)),
                    _ratio(ratios.get("nginx-dialing", {}).get(key)),
                ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    for bd in (t for t in targets if t.startswith("backdial")):
        lines += [f"### {bd} req/s, paired per round (same round, adjacent in time)", ""]
        for c in params["conns"]:
            ratios = summary[str(c)][bd]["ratios"]
            parts = []
            for base in BASELINES:
                if base in ratios:
                    s = ratios[base]["rps_paired"]
                    parts.append(
                        f"x{SHORT[base]} median {_ratio(s['median'])} "
                        f"({_ratio(s['min'])}-{_ratio(s['max'])})"
                    )
            lines.append(f"* c={c}: " + "; ".join(parts))
        lines.append("")
    lines += _render_targets(result)
    for prof in result.get("profile") or []:
        lines += render_profile(prof)
    return "\n".join(lines) + "\n"


def _render_targets(result: dict[str, Any]) -> list[str]:
    lines = ["### targets", ""]
    for name, note in result["target_notes"].items():
        lines.append(f"* **{name}**: {note}")
    lines.append("")
    return lines


def render_profile(profile: dict[str, Any]) -> list[str]:
    lines = [
        f"### sidecar profile (py-spy, {profile['seconds']}s at c={profile['conns']}, "
        f"{profile['samples']} samples{', native frames' if profile['native'] else ''})",
        "",
        f"py-spy samples 200/s and keeps those where the thread was on CPU: "
        f"{profile['samples']} of {profile.get('samples_possible', '?')} possible.",
        "",
        f"Layout: {profile.get('layout', '?')}; wrk during profiling: {profile['rps']:,.0f} "
        f"req/s with the sidecar at {profile.get('sidecar_cpu_pct', float('nan')):.0f}% of a "
        "core (py-spy sampling costs a little).",
        "",
        "| function | self % | cumulative % |",
        "|---|---|---|",
    ]
    for row in profile["top_cumulative"][: profile.get("show", 30)]:
        lines.append(f"| `{row['function']}` | {row['self_pct']:.1f} | {row['cum_pct']:.1f} |")
    lines += ["", "Top by self time:", "", "| function | self % |", "|---|---|"]
    for row in profile["top_self"][:20]:
        lines.append(f"| `{row['function']}` | {row['self_pct']:.1f} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------- profiling


def _collapse(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    total = 0
    self_c: collections.Counter[str] = collections.Counter()
    cum_c: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        # py-spy raw frames: "function (file:line)"; merge lines of one function
        names = [_frame_name(f) for f in frames]
        names = [x for x in names if not x.startswith("process ") and not x.startswith("thread ")]
        if not names:
            continue
        total += n
        self_c[names[-1]] += n
        for name in set(names):
            cum_c[name] += n
    return total, self_c, cum_c


def _frame_name(frame: str) -> str:
    fn, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0] if ":" in where else where
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{fn} ({file})" if file else fn


def _pin(pids: list[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpus, str(pid)],
            capture_output=True,
            check=False,
            timeout=10,
        )


def profile_sidecar(
    stack: Stack, ns: argparse.Namespace, conns: int, ws: Workspace
) -> dict[str, Any] | None:
    """py-spy on the sidecar under wrk load.

    With split pinning the sidecar gets CPU 0 to itself while profiling (acceptor and
    service move next to wrk on CPU 1): on a shared core, samples pile up inside write()
    wherever the woken service preempts the sidecar, which hides the sidecar's own costs.
    The wrk figure of this phase is therefore "the sidecar alone on one core"."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        log("py-spy not found (pip install py-spy); skipping the profile")
        return None
    sidecar = next(p for p in stack.proxy if p.name == "sidecar")
    others = [pid for p in [*stack.proxy, *stack.backend] if p is not sidecar for pid in p.pids()]
    out = ws.path(f"sidecar-profile-c{conns}.txt")
    argv = [
        pyspy,
        "record",
        "--pid",
        str(sidecar.pid),
        "--subprocesses",
        "--rate",
        "200",
        "--duration",
        str(int(ns.profile_seconds)),
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    # --native needs to stop the process for each sample; without it sample without pausing
    argv.append("--native" if ns.profile_native else "--nonblocking")
    alone = ns.server_cpus is not None and ns.wrk_cpus is not None
    if alone:
        _pin(others, ns.wrk_cpus)
    load = subprocess.Popen(
        ([] if ns.wrk_cpus is None else ["taskset", "-c", ns.wrk_cpus])
        + [
            WRK,
            f"-t{ns.threads}",
            f"-c{conns}",
            f"-d{int(ns.profile_seconds) + 3}s",
            "--latency",
            stack.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(1)
        u0 = usage_many(sidecar.pids())
        t0 = time.monotonic()
        spy = subprocess.run(
            argv, capture_output=True, text=True, timeout=ns.profile_seconds + 60, check=False
        )
        t1 = time.monotonic()
        u1 = usage_many(sidecar.pids())
        wrk_out, _ = load.communicate(timeout=ns.profile_seconds + 30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        if alone:
            _pin(others, ns.server_cpus)
    if spy.returncode != 0 or not out.exists():
        log(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}")
        return None
    total, self_c, cum_c = _collapse(out)
    if total == 0:
        return None
    top_cum = [
        {"function": f, "cum_pct": c / total * 100, "self_pct": self_c[f] / total * 100}
        for f, c in cum_c.most_common(40)
    ]
    top_self = [{"function": f, "self_pct": c / total * 100} for f, c in self_c.most_common(25)]
    cpu = sum((u1[p] - u0[p]).cpu for p in u1 if p in u0)
    res = parse_wrk(wrk_out)
    return {
        "seconds": ns.profile_seconds,
        "conns": conns,
        "samples": total,
        "samples_possible": int(200 * ns.profile_seconds),
        "native": ns.profile_native,
        "layout": "sidecar alone on CPU 0" if alone else "as measured",
        "rps": res.rps,
        "sidecar_cpu_pct": cpu / (t1 - t0) * 100,
        "top_cumulative": top_cum,
        "top_self": top_self,
    }


# ---------------------------------------------------------------- main


def _clean(obj: Any) -> Any:
    """NaN (a figure that does not apply, e.g. proxy CPU of 'direct') becomes null."""
    if isinstance(obj, float):
        return None if obj != obj else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally below stops every process we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if ns.pin == "split" and (os.cpu_count() or 1) >= 2:
        server_cpus: str | None = "0"
        wrk_cpus: str | None = "1"
        os.sched_setaffinity(0, {1})  # this harness runs beside wrk, not beside the servers
        pin_note = "proxy + backend processes on CPU 0, wrk (and this harness) on CPU 1"
    else:
        server_cpus = wrk_cpus = None
        pin_note = "none (the scheduler places wrk, proxy and backend)"
    ns.server_cpus, ns.wrk_cpus = server_cpus, wrk_cpus
    started = time.strftime("%Y%m%dT%H%M%S")
    env = environment()  # before the run: the commit the processes were started from
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(keep=ns.keep_tmp)
    stacks: dict[str, Stack] = {}
    runs: list[dict[str, Any]] = []
    profile: list[dict[str, Any]] | None = None
    try:
        log(f"workspace {ws.dir}")
        backend = start_backend(ws, server_cpus)
        stacks["direct"] = backend
        if "nginx-dialing" in ns.targets:
            stacks["nginx-dialing"] = start_nginx(ws, backend, False, server_cpus)
        if "nginx-keepalive" in ns.targets:
            stacks["nginx-keepalive"] = start_nginx(ws, backend, True, server_cpus)
        if "haproxy" in ns.targets:
            stacks["haproxy"] = start_haproxy(ws, backend, server_cpus)
        if "backdial" in ns.targets:
            stacks["backdial"] = start_backdial(ws, server_cpus, ns.sessions, ns.workers)
        for t in ns.targets:
            m = re.fullmatch(r"backdial-([sw])(\d+)", t)
            if m:
                n = int(m.group(2))
                stacks[t] = start_backdial(
                    ws,
                    server_cpus,
                    n if m.group(1) == "s" else ns.sessions,
                    n if m.group(1) == "w" else ns.workers,
                    name=t,
                )
        targets = [t for t in ALL_TARGETS if t in ns.targets]
        targets += [t for t in ns.targets if t not in ALL_TARGETS]
        total = ns.repeat * len(ns.conns) * len(targets)
        i = 0
        for rnd in range(ns.repeat):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for c in ns.conns:
                for t in order:
                    i += 1
                    r = measure_stable(stacks[t], c, ns)
                    r["round"] = rnd
                    runs.append(r)
                    log(
                        f"[{i}/{total}] round {rnd} c={c} {t:<16} {r['rps']:>9,.0f} req/s  "
                        f"p99 {r['p99_ms']:.2f} ms  proxy {r['proxy_cpu_us_per_req']:.1f} µs/req"
                        f"  csw {r['proxy_csw_per_req']:.2f}/req  err {r['errors']}  "
                        f"tw {r['tw_upstream_new']}/{r['tw_client_new']}  "
                        f"other {r['foreign_cpu_pct']:.0f}%/{r['foreign_client_cpu_pct']:.0f}%"
                    )
                    time.sleep(ns.settle)
        if ns.profile and "backdial" in stacks:
            profile = []
            for c in ns.profile_conns:
                log(f"profiling the sidecar with py-spy at c={c}")
                prof = profile_sidecar(stacks["backdial"], ns, c, ws)
                if prof:
                    profile.append(prof)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        ws.stop_all()

    notes = [
        "One worker per proxy (nginx worker_processes 1, haproxy nbthread 1, one sidecar "
        "worker): the machine has 2 cores and wrk needs one, so every proxy gets the same "
        "single core, shared with its backend.",
        "backdial's proxy CPU and context switches are sidecar + acceptor; nginx's are "
        "master + worker. The backend is `backdial serve backdial.demo:app --listen` for the "
        "peers and the same app registering sessions for backdial.",
        "TIME_WAIT: sockets that entered TIME_WAIT during the measured window (set difference "
        "of `ss -tan state time-wait` before/after), by hop; loopback has tcp_tw_reuse, so a "
        "tuple re-used within the window is counted once (a lower bound).",
        "Access logs off everywhere; nginx and haproxy keep client connections alive like "
        "the sidecar does (keepalive_requests raised so wrk is never disconnected).",
    ]
    result: dict[str, Any] = {
        "started": started,
        "params": {
            "duration": ns.duration,
            "warmup": ns.warmup,
            "repeat": ns.repeat,
            "conns": ns.conns,
            "threads": ns.threads,
            "targets": targets,
            "pin": ns.pin,
            "pin_note": pin_note,
            "sessions": ns.sessions,
            "workers": ns.workers,
        },
        "environment": env,
        "notes": notes,
        "target_notes": {t: stacks[t].note for t in targets},
        "runs": runs,
        "summary": summarize(runs, ns.conns, targets),
        "profile": profile,
    }
    json_path = out_dir / f"{started}.json"
    json_path.write_text(json.dumps(_clean(result), indent=1, allow_nan=False) + "\n")
    md = render(result)
    (out_dir / f"{started}.md").write_text(md)
    print(md)
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
