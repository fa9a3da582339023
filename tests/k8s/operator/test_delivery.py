"""A SessionSlice becomes live per-pod capacity and slicing within seconds.

Real control plane, real operator (as its ServiceAccount), kwok pods whose data plane
(acceptor authenticated as the pod, sidecar, demo) runs as local processes.
"""

from __future__ import annotations

import concurrent.futures
import http.client
from typing import Any

import harness
import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import (
    OperatorEnv,
    PodStack,
    condition,
    sessionslice,
    slice_status,
    wait_generation,
)
from tests.stack.test_stack import Load

pytestmark = pytest.mark.k8s
DELIVERY_BOUND = 5.0  # seconds, the bound


def two_slices(per_pod: int = 3, mobile_share: int = 34, **capacity: int) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": {"app": "web"}},
        "capacity": {"sessionsPerPod": per_pod, **capacity},
        "slices": [
            {
                "name": "mobile",
                "match": {"headers": {"x-class": "mobile"}},
                "share": mobile_share,
                "borrow": False,
                "queue": {"maxWaiting": 100, "timeout": "10s"},
            },
            {"name": "default", "share": 100 - mobile_share, "queue": {"timeout": "10s"}},
        ],
    }


def get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def post(port: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path)
    conn.getresponse().read()
    conn.close()


def fleet(ops: OperatorEnv, ns: str, n: int, sessions: int) -> list[PodStack]:
    pods = ops.create_pods(ns, [f"web-{i}" for i in range(n)], {"app": "web"})
    stacks = [ops.start_stack(pod, sessions) for pod in pods]
    for stack in stacks:
        stack.wait_serving()
    return stacks


def test_apply_reaches_every_pod_within_5s_and_caps_hold(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    stacks = fleet(ops, ns, 3, sessions=5)  # the demo wants 5 sessions; the cap will say 3
    wait_for(lambda: all(s.registered() == 5 for s in stacks), timeout=20, what="5 sessions each")
    assert all(s.operator_state()["generation"] == 0 for s in stacks)  # nothing applied yet

    ops.cluster.apply(sessionslice("web", ns, two_slices()))
    took = wait_generation(stacks, 1, timeout=DELIVERY_BOUND)
    print(f"SessionSlice applied -> every acceptor on generation 1 in {took:.2f}s")
    wait_for(lambda: all(s.registered() == 3 for s in stacks), timeout=10, what="cap 3 each")

    # A burst of 30 requests at one pod: never more than 3 in flight at the demo, and the
    # mobile slice (share 34 of 3 sessions = quota 1, no borrowing) never above 1.
    target = stacks[0]
    post(target.port, "/stats/reset")
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        futures = [
            pool.submit(
                get,
                target.port,
                f"/delay?ms=150&group={'mobile' if i % 2 else 'other'}",
                {"x-class": "mobile"} if i % 2 else {},
            )
            for i in range(30)
        ]
        codes = [f.result() for f in futures]
    assert codes == [200] * 30
    stats = target.demo_stats()
    assert stats["max_concurrency"] == 3  # the cap was used and never exceeded
    assert stats["groups"]["mobile"]["max_concurrency"] == 1
    refused = target.state()
    assert refused["limits"]["maxSessions"] == 3

    # Status and printer columns match what the pods report.
    def status_matches() -> bool:
        status = slice_status(ops.cluster, ns, "web")
        registered = sum(s.registered() for s in stacks)
        return (
            status.get("observedGeneration") == 1
            and status.get("configuredPods") == 3
            and status.get("registeredSessions") == registered == 9
            and status.get("requestsWaiting") == 0
            and condition(status, "Ready").get("status") == "True"
        )

    wait_for(status_matches, timeout=10, what="status summing the pods' reports")
    status = slice_status(ops.cluster, ns, "web")
    assert (status["selectedPods"], status["readyPods"], status["perPodSessions"]) == (3, 3, 3)
    assert condition(status, "ConfigApplied")["status"] == "True"
    assert condition(status, "Degraded")["status"] == "False"
    row = ops.cluster.kubectl("-n", ns, "get", "ss", "web", "--no-headers").stdout.split()
    assert row[:5] == ["web", "3", "9", "0", "True"]

    # Editing the SessionSlice under continuous load: every pod within 5 s, nothing fails.
    loads = [Load(s.port, "/delay?ms=10", clients=3) for s in stacks]
    for load in loads:
        load.__enter__()
    try:
        wait_for(lambda: all(load.total > 20 for load in loads), what="load flowing")
        ops.cluster.apply(sessionslice("web", ns, two_slices(per_pod=3, mobile_share=50)))
        took = wait_generation(stacks, 2, timeout=DELIVERY_BOUND)
        print(f"SessionSlice edited under load -> every acceptor on generation 2 in {took:.2f}s")
        totals = [load.total for load in loads]
        wait_for(lambda: all(ld.total > t + 20 for ld, t in zip(loads, totals, strict=True)))
    finally:
        for load in loads:
            load.__exit__()
    assert [load.failures() for load in loads] == [{}, {}, {}]
    quotas = stacks[0].state()["services"]["demo"]["slices"]
    assert (quotas["mobile"]["quota"], quotas["default"]["quota"]) == (2, 1)  # 50/50 of 3


def test_total_sessions_split_and_resplit_when_scaling(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    stacks = fleet(ops, ns, 3, sessions=6)
    spec = two_slices(per_pod=10, totalSessions=12)
    ops.cluster.apply(sessionslice("web", ns, spec))
    wait_generation(stacks, 1, timeout=DELIVERY_BOUND)
    wait_for(lambda: [s.registered() for s in stacks] == [4, 4, 4], timeout=10, what="4 each")

    def capped() -> list[float]:
        return [
            s.metric("backdial_acceptor_sessions_dropped_total", reason="capped") for s in stacks
        ]

    before = capped()
    loads = [Load(s.port, "/delay?ms=10", clients=2) for s in stacks]
    for load in loads:
        load.__enter__()
    try:
        wait_for(lambda: all(load.total > 20 for load in loads), what="load flowing")
        fourth = ops.create_pods(ns, ["web-3"], {"app": "web"})[0]
        stacks.append(ops.start_stack(fourth, sessions=6))
        wait_for(
            lambda: [s.registered() for s in stacks] == [3, 3, 3, 3],
            timeout=15,
            what="3 sessions each after the re-split",
        )
        totals = [load.total for load in loads]
        wait_for(lambda: all(ld.total > t + 20 for ld, t in zip(loads, totals, strict=True)))
    finally:
        for load in loads:
            load.__exit__()
    assert [load.failures() for load in loads] == [{}, {}, {}]
    # One surplus session per old pod, retired by the acceptor.
    assert [after - b for after, b in zip(capped(), before, strict=False)] == [1, 1, 1]

    def settled() -> dict[str, Any] | None:
        status = slice_status(ops.cluster, ns, "web")
        want = {"registeredSessions": 12, "perPodSessions": 3, "configuredPods": 4}
        return status if all(status.get(k) == v for k, v in want.items()) else None

    status = harness.poll(settled, timeout=10, what="status: 4 pods configured, 3 sessions each")
    assert condition(status, "Ready")["status"] == "True"
