"""2,000 kwok pods selected by one SessionSlice: a spec change is reconciled (per-pod
configs computed, status updated) within a measured bound, with one status write, and the
operator's memory is reported.  (Named to run last: it leaves the API server busy while
the pods are deleted.)"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import components
import harness
import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import INJECTED, OperatorEnv, sessionslice, slice_status

pytestmark = [pytest.mark.k8s, pytest.mark.slow, pytest.mark.timeout(900)]
PODS = 2000
NODES = [f"backdial-scale-{i}" for i in range(19)]  # kwok nodes take 110 pods each
BOUND = 10.0  # seconds from the spec change to the status of the new generation


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def create_pods(cluster: harness.Cluster, ns: str) -> None:
    def create(i: int) -> int:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"big-{i:04d}", "labels": {"app": "big", **INJECTED}},
            "spec": {
                "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
                "terminationGracePeriodSeconds": 0,
            },
        }
        # A generous timeout: 2,000 creations at once queue up in a loaded API server.
        path = f"/api/v1/namespaces/{ns}/pods"
        return cluster.api.request("POST", path, body, timeout=120).status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(create, range(PODS)))
    assert set(codes) == {201}


def test_two_thousand_pods(ops: OperatorEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    cluster = ops.cluster
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "big"}},
        "capacity": {"sessionsPerPod": 4, "totalSessions": 5000},
        "slices": [
            {"name": "mobile", "match": {"userAgent": "(?i)android"}, "share": 30},
            {"name": "default", "share": 70},
        ],
    }
    cluster.apply(sessionslice("big", ns, spec))
    for node in NODES:
        components.create_node(cluster.api, node)
    try:
        measure(ops, ns, spec)
    finally:
        # Whatever happened, leave no 2,000 pods behind for kwok and the next tests.
        remove_pods_and_nodes(cluster, ns)


def measure(ops: OperatorEnv, ns: str, spec: dict[str, Any]) -> None:
    cluster = ops.cluster
    started = time.monotonic()
    create_pods(cluster, ns)
    created = time.monotonic() - started

    def all_ready() -> bool:
        status = slice_status(cluster, ns, "big")
        return status.get("selectedPods") == PODS and status.get("readyPods") == PODS

    wait_for(all_ready, timeout=600, what=f"{PODS} pods selected and ready in the status")
    ready = time.monotonic() - started
    status = slice_status(cluster, ns, "big")
    assert status["perPodSessions"] == 3  # 5000 over 2000 ready pods: 2 or 3 each

    before = ops.operator.state()
    changed = time.monotonic()
    spec["capacity"]["totalSessions"] = 7000
    cluster.apply(sessionslice("big", ns, spec))

    def reconciled() -> bool:
        st = slice_status(cluster, ns, "big")
        return st.get("observedGeneration") == 2 and st.get("perPodSessions") == 4

    wait_for(reconciled, timeout=60, what="generation 2 reconciled")
    took = time.monotonic() - changed
    after = ops.operator.state()
    assert ops.operator.proc is not None
    mem = memory(ops.operator.proc.pid)
    writes = {
        verb: after["api_requests"].get(verb, 0) - before["api_requests"].get(verb, 0)
        for verb in ("patch", "post", "put")
    }
    print(
        f"\n{PODS} pods: created in {created:.1f}s, all selected and ready in the status after "
        f"{ready:.1f}s; spec change -> status of generation 2 in {took:.2f}s; "
        f"API writes for it {writes}; operator RSS {mem['VmRSS']:.0f} MiB "
        f"(peak {mem['VmHWM']:.0f} MiB)"
    )
    assert took < BOUND
    assert writes["patch"] <= 2 and writes["post"] == 0 and writes["put"] == 0  # no storm
    assert mem["VmHWM"] < 400


def remove_pods_and_nodes(cluster: harness.Cluster, ns: str) -> None:
    cluster.api.request("DELETE", f"/api/v1/namespaces/{ns}/pods", timeout=120)  # the collection

    def gone() -> bool:
        pods = cluster.get_json(f"/api/v1/namespaces/{ns}/pods?limit=1")
        return not pods["items"]

    wait_for(gone, timeout=300, what="the pods deleted")
    for node in NODES:
        cluster.api.request("DELETE", f"/api/v1/nodes/{node}")
