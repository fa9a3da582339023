# ruff: noqa: RUF001  (the multiplication sign is the ratio sign in the report)
"""PNG plots of one suite result (matplotlib, Agg backend): one function per figure.

Each function takes the suite's result dict and a directory and returns the
file it wrote (or None when the result lacks that scenario), so the report can
embed exactly the figures this run produced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from report import per_conn_ratio

COLORS = {
    "direct": "#999999",
    "nginx-dialing": "#e6a23c",
    "nginx-keepalive": "#2e7d32",
    "haproxy": "#1565c0",
    "backdial": "#c62828",
    "backdial-python": "#ef9a9a",
    "backdial-normal": "#8d6e63",
}


def _color(name: str) -> str:
    return COLORS.get(name, "#6a1b9a")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput(result: dict[str, Any], out: Path) -> Path | None:
    sweep = result.get("sweep")
    if not sweep:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    conns = sweep["conns"]
    for target in sweep["targets"]:
        med = [sweep["summary"][str(c)][target] for c in conns]
        kw = {"color": _color(target), "marker": "o", "label": target}
        axes[0].plot(conns, [m["rps"]["median"] for m in med], **kw)
        axes[1].plot(conns, [m["p50_ms"]["median"] for m in med], **kw)
        axes[2].plot(conns, [m["p99_ms"]["median"] for m in med], **kw)
    titles = ("req/s (median)", "latency p50 (ms)", "latency p99 (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conns, [str(c) for c in conns])
        ax.set_xlabel("concurrent connections (wrk -c)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    return _save(fig, out / "throughput.png")


def cost(result: dict[str, Any], out: Path) -> Path | None:
    sweep = result.get("sweep")
    if not sweep:
        return None
    targets = [t for t in sweep["targets"] if t != "direct"]
    marks = [c for c in (16, 64) if c in sweep["conns"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = (
        ("proxy_cpu_us_per_req", "proxy CPU per request (µs)"),
        ("proxy_csw_per_req", "proxy context switches per request"),
        ("connects_per_req", "TCP connects per request"),
    )
    width = 0.8 / max(1, len(marks))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for j, c in enumerate(marks):
            vals = [sweep["summary"][str(c)][t][key]["median"] or 0.0 for t in targets]
            xs = [i + j * width for i in range(len(targets))]
            ax.bar(
                xs,
                vals,
                width,
                label=f"c={c}",
                color=[_color(t) for t in targets],
                alpha=1.0 if j == 0 else 0.55,
            )
        ax.set_xticks(
            [i + width * (len(marks) - 1) / 2 for i in range(len(targets))],
            targets,
            rotation=20,
            fontsize=8,
        )
        ax.set_title(title + "  (dark c=16, light c=64)")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "cost.png")


def connection_per_request(result: dict[str, Any], out: Path) -> Path | None:
    cpr = result.get("close")
    if not cpr:
        return None
    targets = cpr["targets"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rps = [cpr["summary"][t]["rps"]["median"] for t in targets]
    axes[0].bar(targets, rps, color=[_color(t) for t in targets])
    axes[0].set_title(f"new connection per request, c={cpr['conns']}: req/s")
    tw = [cpr["summary"][t]["tw_upstream_new"]["median"] or 0.0 for t in targets]
    axes[1].bar(targets, tw, color=[_color(t) for t in targets])
    axes[1].set_title("new TIME_WAIT sockets on the proxy→backend hop (keep-alive run, c=16)")
    sweep = result.get("sweep")
    if sweep and "16" in sweep["summary"]:
        keep = [sweep["summary"]["16"][t]["tw_upstream_new"]["median"] or 0.0 for t in targets]
        axes[1].cla()
        axes[1].bar(targets, keep, color=[_color(t) for t in targets])
        axes[1].set_title("new TIME_WAIT, proxy→backend hop, per measured window (c=16)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "connections.png")


def spike(result: dict[str, Any], out: Path) -> Path | None:
    runs = result.get("spike")
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.4 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        s = run["series"]
        ax.plot(s["t"], s["ok_per_s"], color="#2e7d32", label="answered 200 /s")
        ax.plot(s["t"], s["rejected_per_s"], color="#c62828", label="answered 503 /s")
        w = run["window"]
        ax.axvspan(w["spike_start"], w["spike_end"], color="#ffcc80", alpha=0.3, label="10× load")
        ax.set_xlabel("seconds")
        ax.set_ylabel("responses per second")
        ax2 = ax.twinx()
        if s["busy"]:
            ax2.step(
                [b[0] for b in s["busy"]],
                [b[1] for b in s["busy"]],
                color="#1565c0",
                where="post",
                label="sessions busy (backend concurrency)",
            )
        ax2.axhline(run["sessions"], color="#1565c0", linestyle="--", label="declared sessions")
        ax2.set_ylabel("concurrency")
        ax2.set_ylim(0, max(run["sessions"], run["backend_max_concurrency"]) * 1.3)
        ax.set_title(
            f"{run['target']}: backend max concurrency {run['backend_max_concurrency']} "
            f"(declared {run['sessions']})"
        )
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    return _save(fig, out / "spike.png")


def determinism(result: dict[str, Any], out: Path) -> Path | None:
    rows = result.get("determinism")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    top = max(max(r["expected_rps"], r["rps"]) for r in rows) * 1.3
    ax.plot([1, top], [1, top], color="#999999", linestyle="--", label="req/s = S / T")
    for s in sorted({r["sessions"] for r in rows}):
        pts = [r for r in rows if r["sessions"] == s]
        ax.scatter([r["expected_rps"] for r in pts], [r["rps"] for r in pts], label=f"S={s}", s=40)
        for r in pts:
            ax.annotate(
                f"{r['service_ms']}ms {r['error_pct']:+.1f}%",
                (r["expected_rps"], r["rps"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sessions ÷ service time (req/s)")
    ax.set_ylabel("measured req/s")
    ax.set_title("determinism: throughput = sessions ÷ service time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "determinism.png")


def slicing(result: dict[str, Any], out: Path) -> Path | None:
    rows = result.get("slicing")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r["layout"] for r in rows]
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs],
        [r["protected_alone_p99_ms"] for r in rows],
        0.4,
        label="protected alone",
        color="#2e7d32",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [r["protected_flood_p99_ms"] for r in rows],
        0.4,
        label="protected + bulk flood",
        color="#c62828",
    )
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(
            f"{r['p99_change_pct']:+.0f}%",
            (x + 0.2, r["protected_flood_p99_ms"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("protected class p99 (ms)")
    ax.set_title("slicing under contention")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "slicing.png")


def _idle_bars(ax: Any, im: dict[str, Any]) -> None:
    """Bytes per idle connection and with a partial head; the ratio to nginx-keepalive
    over each bar (the bound where growth was below one page)."""
    rows = [r for r in im["rows"] if "idle" in r]
    ref = next((r for r in rows if r["target"] == "nginx-keepalive"), {})
    width = 0.4
    variants = (("idle", "idle", ""), ("head", "partial head", "//"))
    for k, (key, _, hatch) in enumerate(variants):
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        cells = [r[key] for r in rows]
        heights = [(c["bytes"] or 0.0) / 1024 for c in cells]
        ax.bar(xs, heights, width, color=[_color(r["target"]) for r in rows], hatch=hatch,
               edgecolor="#333333", linewidth=0.5)  # fmt: skip
        for x, h, c in zip(xs, heights, cells, strict=True):
            ratio = per_conn_ratio(c, ref.get(key))
            text = f"< {c['below']:.1f} B" if c["bytes"] is None else f"{ratio:.2f}×"
            ax.annotate(text, (x, h), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(rows)), [r["target"] for r in rows])
    ax.set_title(f"RSS per client connection (KiB, {im['connections']:,}, fresh stacks; ×ka)")
    ax.margins(y=0.2)
    ax.legend(
        handles=[Patch(facecolor="#dddddd", edgecolor="#333333", hatch=h, label=label)
                 for _, label, h in variants],
        fontsize=8,
    )  # fmt: skip


def memory_and_bodies(result: dict[str, Any], out: Path) -> Path | None:
    im = result.get("idle_memory")
    idle = result.get("idle_connections") or []  # runs before idle.py's method
    bodies = result.get("large_bodies") or []
    slow = result.get("slow_readers") or []
    if not (im or idle or bodies or slow):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if im:
        _idle_bars(axes[0], im)
    elif idle:
        axes[0].bar(
            [r["target"] for r in idle],
            [r["bytes_per_connection"] / 1024 for r in idle],
            color=[_color(r["target"]) for r in idle],
        )
        axes[0].set_title(f"RSS per idle client connection (KiB, {idle[0]['connections']:,})")
    if bodies:
        axes[1].bar(
            [r["target"] for r in bodies],
            [r["mb_per_s"] for r in bodies],
            color=[_color(r["target"]) for r in bodies],
        )
        axes[1].set_title(f"{bodies[0]['mib']} MiB responses, wrk -c4 (MB/s)")
    if slow:
        axes[2].bar(
            [r["target"] for r in slow],
            [r["ratio"] for r in slow],
            color=[_color(r["target"]) for r in slow],
        )
        axes[2].axhline(0.9, color="#999999", linestyle="--", label="target 0.90")
        axes[2].set_ylim(0, 1.2)
        axes[2].set_title(
            f"fast req/s with {slow[0]['clients']} slow readers of "
            f"{slow[0]['body_kib'] // 1024} MiB ÷ quiet"
        )
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "memory_bodies.png")


ALL = (throughput, cost, connection_per_request, spike, determinism, slicing, memory_and_bodies)


def draw_all(result: dict[str, Any], out: Path) -> list[Path]:
    return [p for fn in ALL if (p := fn(result, out)) is not None]
