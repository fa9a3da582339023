"""A SessionSlice becomes live per-pod capacity and slicing within seconds.

Real control plane, real operator (a local process with its ServiceAccount's RBAC), and
pods that really run on the process node: a Deployment whose pods hold an acceptor (which
dials the operator with the pod's projected token), a sidecar and the demo.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import harness
import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import (
    OperatorEnv,
    condition,
    sessionslice,
    slice_status,
    wait_generation,
)
from tests.k8s.operator.realpods import RealPod, deployment, ready_pods
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


class Loads:
    """Continuous load on several pods; every outcome counted."""

    def __init__(self, pods: list[RealPod], path: str, clients: int) -> None:
        self.loads = [Load(p.port, path, clients, host=p.ip) for p in pods]

    def __enter__(self) -> Loads:
        for load in self.loads:
            load.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for load in self.loads:
            load.__exit__()

    def progress(self, more: int = 20) -> None:
        """Wait until every pod served *more* requests than now."""
        totals = [load.total for load in self.loads]
        wait_for(
            lambda: all(ld.total >= t + more for ld, t in zip(self.loads, totals, strict=True)),
            what="requests flowing on every pod",
        )

    def failures(self) -> list[dict[int | str, int]]:
        return [load.failures() for load in self.loads]


def test_apply_reaches_every_pod_within_5s_and_caps_hold(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    ops.cluster.apply(deployment(ops, ns, "web", replicas=3, sessions=5))
    pods = ready_pods(ops.cluster, ns, "web", 3)
    # The demo wants 5 sessions; nothing applied yet, so all 5 are admitted.
    wait_for(lambda: all(p.registered() == 5 for p in pods), timeout=20, what="5 each")
    assert all(p.operator_state()["generation"] == 0 for p in pods)

    ops.cluster.apply(sessionslice("web", ns, two_slices()))
    took = wait_generation(pods, 1, timeout=DELIVERY_BOUND)
    print(f"SessionSlice applied -> every pod's acceptor on generation 1 in {took:.2f}s")
    wait_for(lambda: all(p.registered() == 3 for p in pods), timeout=10, what="cap 3 each")
    assert all(p.state()["limits"]["maxSessions"] == 3 for p in pods)

    # A burst of 30 requests at one pod: never more than 3 in flight at the demo, and the
    # mobile slice (share 34 of 3 sessions = quota 1, no borrowing) never above 1.
    target = pods[0]
    target.reset_stats()
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        futures = [
            pool.submit(
                target.get,
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
    assert stats["groups"]["other"]["max_concurrency"] <= 2

    # Status and printer columns match what the pods report.
    def status_matches() -> bool:
        status = slice_status(ops.cluster, ns, "web")
        registered = sum(p.registered() for p in pods)
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
    with Loads(pods, "/delay?ms=10", clients=3) as loads:
        loads.progress()
        ops.cluster.apply(sessionslice("web", ns, two_slices(per_pod=3, mobile_share=50)))
        took = wait_generation(pods, 2, timeout=DELIVERY_BOUND)
        print(f"SessionSlice edited under load -> every pod on generation 2 in {took:.2f}s")
        loads.progress()
    assert loads.failures() == [{}, {}, {}]
    quotas = pods[0].state()["services"]["demo"]["slices"]
    assert (quotas["mobile"]["quota"], quotas["default"]["quota"]) == (2, 1)  # 50/50 of 3


def test_total_sessions_split_and_resplit_when_scaling(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    ops.cluster.apply(deployment(ops, ns, "web", replicas=3, sessions=6))
    pods = ready_pods(ops.cluster, ns, "web", 3)
    ops.cluster.apply(sessionslice("web", ns, two_slices(per_pod=10, totalSessions=12)))
    wait_generation(pods, 1, timeout=DELIVERY_BOUND)
    wait_for(lambda: [p.registered() for p in pods] == [4, 4, 4], timeout=10, what="4 each")

    def capped(of: list[RealPod]) -> list[float]:
        return [p.metric("backdial_acceptor_sessions_dropped_total", reason="capped") for p in of]

    before = capped(pods)
    with Loads(pods, "/delay?ms=10", clients=2) as loads:
        loads.progress()
        ops.cluster.kubectl("-n", ns, "scale", "deployment/web", "--replicas=4")
        four = ready_pods(ops.cluster, ns, "web", 4)
        wait_for(
            lambda: [p.registered() for p in four] == [3, 3, 3, 3],
            timeout=15,
            what="3 sessions each after the re-split",
        )
        loads.progress()
    assert loads.failures() == [{}, {}, {}]
    # One surplus session per old pod, retired by the acceptor.
    assert [a - b for a, b in zip(capped(pods), before, strict=True)] == [1, 1, 1]

    def settled() -> dict[str, Any] | None:
        status = slice_status(ops.cluster, ns, "web")
        want = {"registeredSessions": 12, "perPodSessions": 3, "configuredPods": 4}
        return status if all(status.get(k) == v for k, v in want.items()) else None

    status = harness.poll(settled, timeout=10, what="status: 4 pods configured, 3 sessions each")
    assert condition(status, "Ready")["status"] == "True"
