# ruff: noqa: RUF001  (the multiplication sign is the ratio sign in the report)
"""The suite's Markdown report: targets with their status, then one section per scenario.

Pure functions of the result dict (``suite.py`` writes it to ``results.json``),
so a report can be re-rendered from a stored result:
``python3 bench/report.py bench/results/<ts>/results.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

NAN = float("nan")


def _num(value: Any) -> float:
    return NAN if value is None else float(value)


def _f(value: Any, digits: int = 0) -> str:
    v = _num(value)
    if v != v:
        return "—"
    return f"{v:,.{digits}f}"


def _x(value: float) -> str:
    return "—" if value != value else f"{value:.2f}×"


def _med(summary: dict[str, Any], target: str, key: str) -> float:
    cell = summary.get(target, {}).get(key)
    return _num(cell["median"]) if cell else NAN


def _ratio(a: float, b: float) -> float:
    return a / b if a == a and b == b and b else NAN


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(what, measured, met) for every target of issue 11 this result can judge."""
    rows: list[tuple[str, str, bool | None]] = []
    sweep = result.get("sweep")
    if sweep:
        for c in (16, 64):
            s = sweep["summary"].get(str(c))
            if not s:
                continue
            bd = _med(s, "backdial", "rps")
            for peer in ("nginx-keepalive", "haproxy"):
                r = _ratio(bd, _med(s, peer, "rps"))
                rows.append((f"req/s ≥ 1.0× {peer}, c={c}", _x(r), r >= 1.0 if r == r else None))
            cpu = _ratio(
                _med(s, "backdial", "proxy_cpu_us_per_req"),
                _med(s, "nginx-keepalive", "proxy_cpu_us_per_req"),
            )
            rows.append(
                (
                    f"proxy CPU/request ≤ nginx-keepalive's, c={c}",
                    _x(cpu),
                    cpu <= 1.0 if cpu == cpu else None,
                )
            )
            csw = _ratio(
                _med(s, "backdial", "proxy_csw_per_req"),
                _med(s, "nginx-keepalive", "proxy_csw_per_req"),
            )
            rows.append(
                (
                    f"context switches/request ≤ nginx-keepalive's, c={c}",
                    _x(csw),
                    csw <= 1.0 if csw == csw else None,
                )
            )
        s16, s64 = sweep["summary"].get("16"), sweep["summary"].get("64")
        if s16 and s64:
            r = _ratio(_med(s64, "backdial", "rps"), _med(s16, "backdial", "rps"))
            rows.append(
                ("c=64 rate ≥ c=16 rate (16 sessions)", _x(r), r >= 1.0 if r == r else None)
            )
            # For reference, not a target: the same stack with the worker kept on
            # SCHED_OTHER while requests wait (--queued-cpu-policy normal).
            ref = _ratio(_med(s64, "backdial-normal", "rps"), _med(s16, "backdial-normal", "rps"))
            if ref == ref:
                csw = [
                    _ratio(
                        _med(x, "backdial-normal", "proxy_csw_per_req"),
                        _med(x, "nginx-keepalive", "proxy_csw_per_req"),
                    )
                    for x in (s16, s64)
                ]
                rows.append(
                    (
                        "reference, --queued-cpu-policy normal: c=64 ÷ c=16 rate; "
                        "csw/request ×nginx-keepalive at c=16, c=64",
                        f"{_x(ref)}; {_x(csw[0])}, {_x(csw[1])}",
                        None,
                    )
                )
    close = result.get("close")
    if close:
        s = close["summary"]
        bd = _med(s, "backdial", "rps")
        for peer, bar in (("nginx-dialing", 1.75), ("nginx-keepalive", 1.0)):
            r = _ratio(bd, _med(s, peer, "rps"))
            rows.append(
                (f"connection per request: ≥ {bar}× {peer}", _x(r), r >= bar if r == r else None)
            )
    for slow in result.get("slow_readers") or []:
        if slow["target"] == "backdial":
            r = _num(slow["ratio"])
            rows.append(
                (
                    f"{slow['clients']} slow readers of {slow['body_kib'] // 1024} MiB: fast req/s "
                    "≥ 0.90× quiet",
                    _x(r),
                    r >= 0.9 if r == r else None,
                )
            )
    for sp in result.get("spike") or []:
        if sp["target"] == "backdial":
            top = sp["backend_max_concurrency"]
            rows.append(
                (
                    "10× spike: backend concurrency ≤ declared sessions",
                    f"{top} ≤ {sp['sessions']}",
                    top <= sp["sessions"],
                )
            )
    for sl in result.get("slicing") or []:
        if sl["layout"] == "slices":
            ch = _num(sl["p99_change_pct"])
            rows.append(
                (
                    "slicing: protected p99 moves ≤ 10%",
                    f"{ch:+.1f}%",
                    ch <= 10 if ch == ch else None,
                )
            )
    return rows


def environment_line(env: dict[str, Any]) -> str:
    """Machine, peers' versions and the commit measured, in one sentence."""
    v = env["versions"]
    return (
        f"{env['cpus']} CPUs ({env['cpu_model']}), kernel {v['kernel']}; {v['nginx']}; "
        f"{v['haproxy']}; {v['wrk']}; Python {v['python']}, uvloop {v['uvloop']}, "
        f"httptools {v['httptools']}; backdial {v['backdial_commit']}."
    )


def render(
    result: dict[str, Any], images: list[str], img_prefix: str, heading_level: int = 1
) -> str:
    h = "#" * heading_level
    p = result["params"]
    lines = [
        f"{h} Suite run {result['started']}",
        "",
        f"{environment_line(result['environment'])} "
        f"Pinning {p['pin']}; {p['duration']} s windows after {p['warmup']} s warm-up; "
        f"{p['rounds']} rounds at c=16/64; whole run {result.get('elapsed_s', '?')} s.",
        "",
    ]
    rows = targets(result)
    if rows:
        lines += [f"{h}# Targets (issue 11)", "", "| target | measured | met |", "|---|---|---|"]
        for what, measured, met in rows:
            mark = "—" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {what} | {measured} | {mark} |")
        lines.append("")
    lines += _sweep(result, h)
    lines += _close(result, h)
    lines += _bodies(result, h)
    lines += _spike(result, h)
    lines += _determinism(result, h)
    lines += _slicing(result, h)
    lines += _memory(result, h)
    lines += _profile(result, h)
    if images:
        lines += [f"{h}# Plots", ""]
        for name in images:
            lines += [f"![{name[:-4]}]({img_prefix}{name})", ""]
    return "\n".join(lines) + "\n"


SWEEP_KEYS = (
    ("rps", "req/s", 0),
    ("p50_ms", "p50 ms", 2),
    ("p99_ms", "p99 ms", 2),
    ("proxy_cpu_us_per_req", "proxy CPU µs/req", 1),
    ("proxy_csw_per_req", "proxy csw/req", 3),
    ("connects_per_req", "connects/req", 3),
    ("tw_upstream_new", "new TIME_WAIT proxy→backend", 0),
)


def _conns_head(conns: list[int]) -> list[str]:
    """The head of a table with one column per concurrency."""
    return [
        "| target | " + " | ".join(f"c={c}" for c in conns) + " |",
        "|---|" + "---|" * len(conns),
    ]


def _sweep(result: dict[str, Any], h: str) -> list[str]:
    sweep = result.get("sweep")
    if not sweep:
        return []
    conns, targets_ = sweep["conns"], sweep["targets"]
    out = [
        f"{h}# Keep-alive clients: concurrency sweep",
        "",
        "wrk `GET /` (20-byte body); medians over rounds; ×ka = ratio to nginx-keepalive at "
        "the same concurrency.",
        "",
    ]
    for key, label, digits in SWEEP_KEYS:
        out += [
            f"**{label}**",
            "",
            *_conns_head(conns),
        ]
        for t in targets_:
            cells = []
            for c in conns:
                s = sweep["summary"][str(c)]
                val = _med(s, t, key)
                ka = _ratio(val, _med(s, "nginx-keepalive", key))
                cell = _f(val, digits)
                if t.startswith("backdial") and key in RATIO_KEYS:
                    cell += f" ({_x(ka)})"
                cells.append(cell)
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out.append("")
    return out + _sweep_errors(sweep)


def _sweep_errors(sweep: dict[str, Any]) -> list[str]:
    """Answers that were not 2xx (a bounded queue's 503s) and socket errors, as a share of
    wrk's requests: req/s above counts every answer, so a fast 503 counts as one too."""
    conns, targets_ = sweep["conns"], sweep["targets"]
    out = [
        "**not 2xx or socket errors, % of requests** (backdial's queue holds `maxWaiting` "
        "requests; beyond it the answer is a fast 503, which req/s above counts too)",
        "",
        *_conns_head(conns),
    ]
    for t in targets_:
        cells = []
        for c in conns:
            shares = [
                100.0 * r["errors"] / r["wrk"]["requests"]
                for r in sweep["runs"]
                if r["target"] == t and r["conns"] == c and r["wrk"]["requests"]
            ]
            cells.append(_f(statistics.median(shares), 1) if shares else "—")
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    return [*out, ""]


RATIO_KEYS = ("rps", "proxy_cpu_us_per_req", "proxy_csw_per_req")


def _close(result: dict[str, Any], h: str) -> list[str]:
    close = result.get("close")
    if not close:
        return []
    s = close["summary"]
    out = [
        f"{h}# A new connection per request (the seed's method)",
        "",
        f"wrk -c{close['conns']} with `Connection: close`: every request opens a client "
        "connection; medians over rounds.",
        "",
        "| target | req/s | ×dial | ×ka | p99 ms | proxy CPU µs/req | proxy csw/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in close["targets"]:
        rps = _med(s, t, "rps")
        dial = _x(_ratio(rps, _med(s, "nginx-dialing", "rps")))
        ka = _x(_ratio(rps, _med(s, "nginx-keepalive", "rps")))
        cpu = _f(_med(s, t, "proxy_cpu_us_per_req"), 1)
        csw = _f(_med(s, t, "proxy_csw_per_req"), 3)
        out.append(
            f"| {t} | {_f(rps)} | {dial} | {ka} | {_f(_med(s, t, 'p99_ms'), 2)} | {cpu} | {csw} |"
        )
    return [*out, ""]


def _bodies(result: dict[str, Any], h: str) -> list[str]:
    out: list[str] = []
    bodies = result.get("large_bodies")
    if bodies:
        ng = next((b["mb_per_s"] for b in bodies if b["target"] == "nginx-keepalive"), NAN)
        out += [
            f"{h}# Large responses",
            "",
            f"{bodies[0]['mib']} MiB chunked responses, wrk -c4.",
            "",
            "| target | MB/s | ×nginx-keepalive | errors |",
            "|---|---|---|---|",
        ]
        for b in bodies:
            out.append(
                f"| {b['target']} | {_f(b['mb_per_s'])} | {_x(_ratio(b['mb_per_s'], ng))} | "
                f"{b['errors']} |"
            )
        out.append("")
    slow = result.get("slow_readers")
    if slow:
        out += [
            f"{h}# Slow readers",
            "",
            f"{slow[0]['clients']} clients each read a {slow[0]['body_kib'] // 1024} MiB response "
            "at 1 KiB/s while wrk -c16 measures `GET /`.",
            "",
            "| target | quiet req/s | with slow readers | ratio | p99 quiet / slow (ms) | "
            "slow readers answered 200 | sessions busy |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in slow:
            busy = "—" if s["sessions_busy"] is None else str(s["sessions_busy"])
            out.append(
                f"| {s['target']} | {_f(s['quiet_rps'])} | {_f(s['slow_rps'])} | "
                f"{_f(s['ratio'], 3)} | {_f(s['quiet_p99_ms'], 2)} / {_f(s['slow_p99_ms'], 2)} | "
                f"{s['slow_clients']['status_200']}/{s['clients']} | {busy} |"
            )
        out.append("")
    return out


def _spike(result: dict[str, Any], h: str) -> list[str]:
    runs = result.get("spike")
    if not runs:
        return []
    r0 = runs[0]
    w = r0["window"]
    out = [
        f"{h}# 10× spike",
        "",
        f"{r0['steady_clients']} clients at one request per {r0['service_ms']} ms each (half the "
        f"capacity of {r0['sessions']} sessions × {r0['service_ms']} ms), then "
        f"{r0['spike_clients']} clients for {w['spike_end'] - w['spike_start']:.0f} s. "
        f"backdial's slice queue holds {r0['sessions']} (timeout 1 s).",
        "",
        "| target | backend max concurrency | declared | steady p99 ms "
        "| spike admitted p50 / p99 ms | admitted in spike | 503s | 503 p50 / p99 ms "
        "| other errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        out.append(
            f"| {r['target']} | {r['backend_max_concurrency']} | {r['sessions']} | "
            f"{_f(r['steady_p99_ms'], 1)} | {_f(r['spike_admitted_p50_ms'], 1)} / "
            f"{_f(r['spike_admitted_p99_ms'], 1)} | {r['spike_admitted']} | {r['rejected_503']} | "
            f"{_f(r['rejected_p50_ms'], 2)} / {_f(r['rejected_p99_ms'], 2)} | {r['other_status']} |"
        )
    return [*out, ""]


def _determinism(result: dict[str, Any], h: str) -> list[str]:
    rows = result.get("determinism")
    if not rows:
        return []
    out = [
        f"{h}# Determinism",
        "",
        "Saturated (wrk -c 2S) `/delay?ms=T` through S sessions: measured req/s against S ÷ T.",
        "",
        "| sessions S | service time T | S ÷ T req/s | measured req/s | error | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['sessions']} | {r['service_ms']} ms | {_f(r['expected_rps'])} | "
            f"{_f(r['rps'])} | {r['error_pct']:+.1f}% | {_f(r['p99_ms'], 1)} | {r['errors']} |"
        )
    return [*out, ""]


def _slicing(result: dict[str, Any], h: str) -> list[str]:
    rows = result.get("slicing")
    if not rows:
        return []
    out = [
        f"{h}# Slicing under contention",
        "",
        "Protected class: `X-Class: api`, wrk -c4 `/delay?ms=5`; bulk flood: wrk -c200 "
        "`/delay?ms=50`; 16 sessions. `slices`: protected 50 %, bulk 50 % (both may borrow); "
        "`one-slice`: everyone shares one queue. The flood runs alone for 3.5 s first, longer "
        "than `leaseIdleRelease`, so the protected slice's leases idle out and the bulk slice "
        "borrows every session; the protected class then needs its quota back under load. "
        "*Waited*: protected requests that waited for a session under the flood (mean wait); "
        "the rest of the change is the CPU the flood takes on the shared core.",
        "",
        "| layout | protected p99 alone | with flood | change | protected req/s alone / flood | "
        "waited | bulk req/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        waits = r.get("protected_waits_flood")
        waited = "—" if waits is None else f"{waits:.0f} ({_f(r['protected_wait_mean_ms'], 1)} ms)"
        out.append(
            f"| {r['layout']} | {_f(r['protected_alone_p99_ms'], 2)} ms | "
            f"{_f(r['protected_flood_p99_ms'], 2)} ms | {r['p99_change_pct']:+.1f}% | "
            f"{_f(r['protected_rps_alone'])} / {_f(r['protected_rps_flood'])} | {waited} | "
            f"{_f(r['bulk_rps'])} | {r['protected_errors'] + r['bulk_errors']} |"
        )
    return [*out, ""]


def per_conn_text(cell: dict[str, Any] | None) -> str:
    """A bytes-per-connection cell (``idle.per_connection``): a figure, a bound, or a dash."""
    if not cell:
        return "—"
    if cell["bytes"] is None:
        return f"< {cell['below']:.1f} (below one page)"
    return f"{cell['bytes']:,.0f}"


def per_conn_ratio(cell: dict[str, Any] | None, ref: dict[str, Any] | None) -> float:
    """*cell* ÷ *ref* when both are resolved figures, else NaN."""
    if not cell or not ref or cell["bytes"] is None or ref["bytes"] is None:
        return NAN
    return float(cell["bytes"]) / float(ref["bytes"])


def _idle_memory(im: dict[str, Any], h: str) -> list[str]:
    n = im["connections"]
    asked = im.get("requested", n)
    clamp = (
        f" ({asked:,} asked; the open-file limit allows no more for haproxy)" if asked > n else ""
    )
    out = [
        f"{h}# Memory",
        "",
        f"Proxy RSS per client connection, {n:,} connections{clamp}, every target started "
        "anew for this measurement (not the stacks that carried the load above). *idle*: "
        "connected, nothing sent; *partial head*: then each sends "
        f"`{im['partial_head'].strip()!r}` without the blank line that ends a head (a "
        "slowloris client), counted from the same start (*of which the head*: growth over "
        "*idle*). Every connection was counted open by the proxy itself "
        "before and after RSS was read. RSS moves in pages: growth below one page "
        f"({im['page_bytes']:,} B) shows as a bound. ×ka: ratio to nginx-keepalive. Kernel: "
        "slab + TCP buffers machine-wide, both ends of each loopback connection, not in RSS "
        "and not the proxy's doing (indicative; other processes move it too).",
        "",
        "| target | RSS before (MiB) | idle: bytes per connection | ×ka | partial head: bytes "
        "per connection | ×ka | of which the head | kernel, both ends (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = next((r for r in im["rows"] if r["target"] == "nginx-keepalive" and "idle" in r), {})
    for r in im["rows"]:
        if "error" in r:
            out.append(f"| {r['target']} | not measured: {r['error']} | | | | | | |")
            continue
        out.append(
            f"| {r['target']} | {r['rss_before_kib'] / 1024:.1f} | {per_conn_text(r['idle'])} | "
            f"{_x(per_conn_ratio(r['idle'], ref.get('idle')))} | {per_conn_text(r['head'])} | "
            f"{_x(per_conn_ratio(r['head'], ref.get('head')))} | "
            f"{per_conn_text(r.get('head_extra'))} | {_f(r['kernel_bytes_per_connection'])} |"
        )
    return [*out, ""]


def _memory(result: dict[str, Any], h: str) -> list[str]:
    out: list[str] = []
    im = result.get("idle_memory")
    if im:
        out += _idle_memory(im, h)
    idle = result.get("idle_connections")  # runs before the fresh-stack method (idle.py)
    if idle:
        out += [
            f"{h}# Memory",
            "",
            f"RSS growth of the proxy processes with {idle[0]['connections']:,} idle client "
            "connections (connected, nothing sent), measured on stacks that had already "
            "carried load (an earlier method: their heaps had room, so 0 means unmeasured):",
            "",
            "| target | RSS before (MiB) | after (MiB) | bytes per connection |",
            "|---|---|---|---|",
        ]
        for r in idle:
            out.append(
                f"| {r['target']} | {r['rss_before_kib'] / 1024:.1f} | "
                f"{r['rss_after_kib'] / 1024:.1f} | {_f(r['bytes_per_connection'])} |"
            )
        out.append("")
    sm = result.get("sessions_memory")
    if sm:
        a, b = sm["rows"]
        out += [
            f"Sessions: acceptor RSS {a['acceptor_rss_kib'] / 1024:.1f} MiB with {a['sessions']} "
            f"registered, {b['acceptor_rss_kib'] / 1024:.1f} MiB with {b['sessions']}: "
            f"**{_f(sm['acceptor_bytes_per_session'])} bytes per registered session**. Sidecar, "
            f"after a load that leased them (held {a['held']} / {b['held']}): "
            f"{a['sidecar_rss_kib'] / 1024:.1f} / {b['sidecar_rss_kib'] / 1024:.1f} MiB, "
            f"**{_f(sm['sidecar_bytes_per_leased_session'])} bytes per leased session**.",
            "",
        ]
    return out


def _profile(result: dict[str, Any], h: str) -> list[str]:
    runs = result.get("profile")
    if not runs:
        return []
    out = [
        f"{h}# Where the sidecar's Python time goes",
        "",
        "`bench/inproc.py`: the real client connection, lease pool and session objects in "
        "one process with stand-in transports (no event loop dispatch, no syscalls), "
        "keep-alive `GET /`, 16 sessions; cProfile shares of own time.",
        "",
        "| clients | µs per request (in process) |",
        "|---|---|",
    ]
    out += [f"| {r['clients']} | {_f(r['us_per_request'], 1)} |" for r in runs]
    out += ["", "| function | calls / request | own % | cumulative % |", "|---|---|---|---|"]
    for row in runs[0]["top"][:15]:
        out.append(
            f"| `{row['function']}` | {row['calls_per_request']:.2f} | "
            f"{row['self_pct']:.1f} | {row['cum_pct']:.1f} |"
        )
    return [*out, ""]


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    pngs = sorted(p.name for p in Path(sys.argv[1]).parent.glob("*.png"))
    print(render(data, pngs, ""))
