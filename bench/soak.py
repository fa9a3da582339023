"""Soak and fault run: mixed load for a long time while parts of the data plane are killed.

    python3 bench/soak.py                      # 30 minutes (the documented run)
    python3 bench/soak.py --duration 120       # a short one for development

Everything runs on 127.0.0.1: an acceptor, a sidecar with two workers, and two
instances of ``bench/soakapp.py`` (``backdial serve``).  Client threads send a
paced mix (fast and slow GETs, small, 200 KB and 2 MB POSTs: the last spooled
before leasing) with a unique id each.  Every ``--fault-interval`` seconds the
next fault of a fixed cycle strikes: ``kill -9`` of a service, a config reload,
``kill -9`` of one sidecar worker, a capacity change, an acceptor restart,
``kill -9`` of the whole sidecar, a graceful service restart.

The report counts requests sent, answered ok, failed by cause (503, 502,
connection errors...), **duplicated** (a POST the services recorded more than
once; must be 0), and **lost** (an ok answer the services never recorded, an
answer carrying another request's id or a corrupted body, or a request that
never got any outcome; must be 0), plus RSS and open descriptors of every
process at its start (after a warm-up) and end.  Exit status 1 when anything
was duplicated or lost.  Results: ``bench/results/<timestamp>-soak.json|md``
(``--out`` to choose).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH_DIR,
    HOST,
    Proc,
    Workspace,
    backdial_cmd,
    descendants,
    free_port,
    log,
    rss_kib,
    wait_http,
)

CONFIGS = (
    "slices: [{name: default, share: 100, queue: {maxWaiting: 400, timeout: 2s}}]\n",
    "slices:\n"
    "- {name: bulk, share: 30, match: {pathPrefixes: [/soak/bulk]}, queue: {maxWaiting: 100, "
    "timeout: 2s}}\n"
    "- {name: default, share: 70, queue: {maxWaiting: 300, timeout: 2s}}\n",
)
FAULTS = (
    "kill-service",
    "reload-config",
    "kill-sidecar-worker",
    "capacity-up",
    "restart-acceptor",
    "capacity-down",
    "kill-sidecar",
    "restart-service",
)
# (weight, method, path, body bytes, service delay ms)
MIX = (
    (55, "GET", "/soak", 0, 0),
    (15, "GET", "/soak", 0, 20),
    (15, "POST", "/soak", 4_000, 0),
    (10, "POST", "/soak/bulk", 200_000, 0),
    (5, "POST", "/soak/bulk", 2_000_000, 0),
)


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Incarnation:
    """One process (with its children) between its start and its end."""

    role: str
    proc: Proc
    started: float
    start: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    how_ended: str = ""

    def sample(self) -> dict[str, int]:
        pids = self.proc.pids()
        return {
            "pids": len(pids),
            "rss_kib": rss_kib(pids),
            "fds": sum(_fds(p) for p in pids),
        }


class Cluster:
    """The processes of the run, restartable by role."""

    def __init__(self, ws: Workspace, sessions: int) -> None:
        self.ws = ws
        self.run_dir = ws.path("run")
        self.run_dir.mkdir()
        self.logs = ws.path("ids")
        self.logs.mkdir()
        self.config = ws.path("config.yaml")
        self.config.write_text(CONFIGS[0])
        self.config_index = 0
        self.port = free_port()
        self.acceptor_admin = f"{HOST}:{free_port()}"
        self.sidecar_admin = f"{HOST}:{free_port()}"
        self.sessions = sessions
        self.live: dict[str, Incarnation] = {}
        self.history: list[Incarnation] = []

    # -- processes -------------------------------------------------------------------------
    def _start(self, role: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(role, argv, self.ws.path(f"{role}.log"), env=env)
        proc.start()
        inc = Incarnation(role, proc, time.monotonic())
        self.live[role] = inc
        self.history.append(inc)
        return proc

    def start_acceptor(self) -> None:
        argv = backdial_cmd(
            "acceptor", "--run-dir", str(self.run_dir), "--config", str(self.config),
            "--admin", self.acceptor_admin, "--reload-interval", "0.5", "--log-level", "warning",
        )  # fmt: skip
        proc = self._start("acceptor", argv)
        wait_http(f"http://{self.acceptor_admin}/healthz", 20, [proc])

    def start_sidecar(self) -> None:
        argv = backdial_cmd(
            "sidecar", "--run-dir", str(self.run_dir), "--listen", f"{HOST}:{self.port}",
            "--admin", self.sidecar_admin, "--workers", "2", "--drain-timeout", "5",
            "--spill-dir", str(self.run_dir), "--log-level", "warning",
        )  # fmt: skip
        self._start("sidecar", argv)

    def start_service(self, name: str) -> None:
        argv = backdial_cmd(
            "serve", "soakapp:app", "--register", f"unix://{self.run_dir}/register.sock",
            "--sessions", str(self.sessions), "--service", "soak", "--instance", name,
            "--drain-timeout", "5", "--log-level", "warning",
        )  # fmt: skip
        env = {"PYTHONPATH": str(BENCH_DIR), "SOAK_LOG_DIR": str(self.logs)}
        self._start(f"service-{name}", argv, env)

    def ready(self) -> None:
        wait_http(f"http://{self.sidecar_admin}/readyz", 30, [i.proc for i in self.live.values()])

    def end(self, role: str, how: str, sig: int | None = None) -> None:
        inc = self.live.pop(role)
        inc.end = inc.end or inc.sample()
        inc.how_ended = how
        if sig is None:
            inc.proc.stop(timeout=15)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inc.proc.pid, sig)
            assert inc.proc.popen is not None
            inc.proc.popen.wait(15)

    def sample_starts(self, warm: float) -> None:
        now = time.monotonic()
        for inc in self.live.values():
            if not inc.start and now - inc.started >= warm:
                inc.start = inc.sample()

    def sample_ends(self) -> None:
        """Under load, like every start sample (so the two compare)."""
        for inc in self.live.values():
            inc.end = inc.sample()

    def stop_all(self) -> None:
        for role in ("service-a", "service-b", "sidecar", "acceptor"):
            if role in self.live:
                self.end(role, "end of run")

    # -- faults ------------------------------------------------------------------------------
    def fault(self, name: str) -> None:
        if name == "kill-service":
            self.end("service-b", "kill -9", signal.SIGKILL)
            self.start_service("b")
        elif name == "restart-service":
            self.end("service-b", "SIGTERM (drain)")
            self.start_service("b")
        elif name == "reload-config":
            self.config_index ^= 1
            self.config.write_text(CONFIGS[self.config_index])
        elif name == "kill-sidecar-worker":
            workers = descendants(self.live["sidecar"].proc.pid)
            if workers:
                os.kill(random.choice(workers), signal.SIGKILL)
        elif name in ("capacity-up", "capacity-down"):
            sig = signal.SIGUSR1 if name == "capacity-up" else signal.SIGUSR2
            os.kill(self.live["service-a"].proc.pid, sig)
        elif name == "restart-acceptor":
            self.end("acceptor", "SIGTERM")
            self.start_acceptor()
        elif name == "kill-sidecar":
            self.end("sidecar", "kill -9 (with its workers)", signal.SIGKILL)
            self.start_sidecar()
        else:
            raise ValueError(name)


class Clients:
    """Paced client threads; every request's outcome is counted exactly once."""

    def __init__(self, port: int, threads: int, rate: float, seed: int) -> None:
        self.port = port
        self.interval = threads / rate
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.ok: dict[str, str] = {}  # id -> method, answered correctly
        self.failed: collections.Counter[str] = collections.Counter()
        self.failures: list[tuple[float, str]] = []  # (monotonic time, cause)
        # Each failure: id, method, path, body size, sent and failed at (monotonic), cause.
        self.failure_detail: list[dict[str, Any]] = []
        self.bad: list[str] = []  # answers with a wrong id or body
        self.pending: set[str] = set()
        self.threads = [
            threading.Thread(target=self._run, args=(i, seed + i), daemon=True)
            for i in range(threads)
        ]
        weights = [m[0] for m in MIX]
        self.cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
        self.bodies = {size: os.urandom(size) for _, _, _, size, _ in MIX if size}

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def _pick(self, rng: random.Random) -> tuple[str, str, int, int]:
        x = rng.uniform(0, self.cumulative[-1])
        for bound, (_, method, path, size, ms) in zip(self.cumulative, MIX, strict=True):
            if x <= bound:
                return method, path, size, ms
        raise AssertionError("unreachable")

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        conn: http.client.HTTPConnection | None = None
        seq = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            seq += 1
            rid = f"c{index}-{seq}"
            method, path, size, ms = self._pick(rng)
            body = self.bodies[size] if size else b""
            target = f"{path}?id={rid}" + (f"&ms={ms}" if ms else "")
            with self.lock:
                self.sent += 1
                self.pending.add(rid)
            outcome = "ok"
            sent_at = time.monotonic()
            try:
                if conn is None or rng.random() < 0.05:  # some requests on new connections
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=20)
                conn.request(method, target, body=body or None)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                if resp.status != 200:
                    outcome = f"http_{resp.status}"
                else:
                    answer = json.loads(data)
                    good = (
                        answer["id"] == rid
                        and answer["len"] == len(body)
                        and answer["crc"] == zlib.crc32(body)
                    )
                    outcome = "ok" if good else "bad"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                outcome = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.pending.discard(rid)
                if outcome == "ok":
                    self.ok[rid] = method
                elif outcome == "bad":
                    self.bad.append(rid)
                else:
                    self.failed[outcome] += 1
                    now = time.monotonic()
                    self.failures.append((now, outcome))
                    self.failure_detail.append(
                        {"id": rid, "method": method, "path": path, "size": size, "ms": ms,
                         "sent": sent_at, "failed": now, "cause": outcome}
                    )  # fmt: skip
        if conn is not None:
            conn.close()


def recorded(logs: Path) -> collections.Counter[tuple[str, str]]:
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in logs.glob("ids-*.log"):
        for line in path.read_text().splitlines():
            rid, _, method = line.partition(" ")
            seen[(rid, method)] += 1
    return seen


def run(args: argparse.Namespace) -> dict[str, Any]:
    ws = Workspace(keep=args.keep)
    cluster = Cluster(ws, args.sessions)
    clients = Clients(0, args.clients, args.rate, args.seed)
    faults: list[dict[str, Any]] = []
    try:
        cluster.start_acceptor()
        cluster.start_service("a")
        cluster.start_service("b")
        cluster.start_sidecar()
        cluster.ready()
        clients.port = cluster.port
        clients.start()
        log(f"soak: {args.duration:.0f} s, a fault every {args.fault_interval:.0f} s")
        start = time.monotonic()
        next_fault = start + args.fault_interval
        index = 0
        while (now := time.monotonic()) < start + args.duration:
            cluster.sample_starts(args.warmup)
            if now >= next_fault:
                name = args.faults[index % len(args.faults)]
                index += 1
                log(f"fault {index}: {name} (sent {clients.sent}, ok {len(clients.ok)})")
                cluster.fault(name)
                faults.append({"at_s": round(now - start, 1), "fault": name, "t": now})
                next_fault += args.fault_interval
            time.sleep(0.5)
        cluster.sample_starts(0)
        cluster.sample_ends()
        clients.stop()
        cluster.stop_all()
    finally:
        clients.stop_event.set()
        cluster.stop_all()
        seen = recorded(cluster.logs)  # before the workspace goes
        ws.stop_all()
    duplicated = sorted(rid for (rid, m), n in seen.items() if m == "POST" and n > 1)
    retried = sum(1 for (rid, m), n in seen.items() if m == "GET" and n > 1)
    unrecorded = sorted(rid for rid, m in clients.ok.items() if not seen[(rid, m)])
    lost = len(unrecorded) + len(clients.bad) + len(clients.pending)
    # Each failure is put down to the last fault before it (within one interval), if any.
    by_fault: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for t, cause in clients.failures:
        before = [f for f in faults if f["t"] <= t and t - f["t"] < args.fault_interval]
        by_fault[before[-1]["fault"] if before else "no fault"][cause] += 1
    failures = []
    for d in clients.failure_detail:  # times relative to the start and to the fault before
        before = [f for f in faults if f["t"] <= d["sent"]]
        failures.append(
            dict(
                d,
                sent=round(d["sent"] - start, 3),
                failed=round(d["failed"] - start, 3),
                after=before[-1]["fault"] if before else "",
                after_s=round(d["sent"] - before[-1]["t"], 3) if before else None,
            )
        )
    for f in faults:
        del f["t"]
    result = {
        "duration_s": args.duration,
        "fault_interval_s": args.fault_interval,
        "clients": args.clients,
        "target_rate": args.rate,
        "sent": clients.sent,
        "ok": len(clients.ok),
        "failed": dict(sorted(clients.failed.items())),
        "failed_total": sum(clients.failed.values()),
        "failed_after_fault": {k: dict(v) for k, v in sorted(by_fault.items())},
        "duplicated": len(duplicated),
        "duplicated_ids": duplicated[:20],
        "idempotent_retried": retried,
        "lost": lost,
        "lost_detail": {
            "ok_without_record": unrecorded[:20],
            "wrong_answer": clients.bad[:20],
            "no_outcome": sorted(clients.pending)[:20],
        },
        "faults": faults,
        "failures": failures,
        "processes": [
            {
                "role": inc.role,
                "lived_s": round(time.monotonic() - inc.started, 1) if not inc.end else None,
                "ended": inc.how_ended,
                "start": inc.start,
                "end": inc.end,
            }
            for inc in cluster.history
        ],
    }
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Soak: {r['duration_s']:.0f} s, {r['clients']} clients at {r['target_rate']:.0f} req/s, "
        f"a fault every {r['fault_interval_s']:.0f} s ({len(r['faults'])} faults).",
        "",
        "| sent | ok | failed | duplicated | lost | idempotent retried |",
        "|---|---|---|---|---|---|",
        f"| {r['sent']} | {r['ok']} | {r['failed_total']} | {r['duplicated']} | {r['lost']} "
        f"| {r['idempotent_retried']} |",
        "",
        "Failed by cause: "
        + (", ".join(f"`{k}` {v}" for k, v in r["failed"].items()) or "none")
        + ".",
        "",
        "| failures after the fault | causes |",
        "|---|---|",
        *(
            f"| {fault} | " + ", ".join(f"`{k}` {v}" for k, v in causes.items()) + " |"
            for fault, causes in r["failed_after_fault"].items()
        ),
        "",
        "| process | ended by | RSS start → end (MiB) | fds start → end |",
        "|---|---|---|---|",
    ]
    for p in r["processes"]:
        s, e = p["start"], p["end"]
        if not s or not e:
            continue
        lines.append(
            f"| {p['role']} | {p['ended']} | {s['rss_kib'] / 1024:.1f} → {e['rss_kib'] / 1024:.1f} "
            f"| {s['fds']} → {e['fds']} |"
        )
    return "\n".join(lines) + "\n"


def _faults(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FAULTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"faults are {', '.join(FAULTS)}")
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1800, help="seconds of load (default 1800)")
    p.add_argument("--fault-interval", type=float, default=30, help="seconds between faults")
    p.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--rate", type=float, default=200, help="requests per second, all clients")
    p.add_argument("--sessions", type=int, default=8, help="sessions per service instance")
    p.add_argument("--warmup", type=float, default=5, help="seconds before a start sample")
    p.add_argument(
        "--faults",
        type=_faults,
        default=FAULTS,
        help="comma-separated faults to cycle through (default: all, in the documented order)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="result file stem (default bench/results/<time>-soak)")
    p.add_argument("--keep", action="store_true", help="keep the workspace (logs)")
    args = p.parse_args()
    result = run(args)
    stem = (
        Path(args.out) if args.out else BENCH_DIR / "results" / time.strftime("%Y%m%dT%H%M%S-soak")
    )
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["duplicated"] or result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
