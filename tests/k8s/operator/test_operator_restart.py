"""The operator can die: pods keep serving with their last config (also across a restart
of their acceptor), and after its restart the fleet re-converges and the status is right."""

from __future__ import annotations

import os
import signal

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
from tests.k8s.operator.realpods import ACCEPTOR_ADMIN, deployment, ready_pods
from tests.k8s.operator.test_delivery import Loads

pytestmark = pytest.mark.k8s


def spec(per_pod: int) -> dict[str, object]:
    return {"selector": {"matchLabels": {"app": "web"}}, "capacity": {"sessionsPerPod": per_pod}}


def test_killed_operator_leaves_pods_configured_and_reconverges(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    ops.cluster.apply(deployment(ops, ns, "web", replicas=2, sessions=4))
    pods = ready_pods(ops.cluster, ns, "web", 2)
    ops.cluster.apply(sessionslice("web", ns, spec(2)))
    wait_generation(pods, 1, timeout=5)
    wait_for(lambda: [p.registered() for p in pods] == [2, 2], what="2 sessions each")

    # Load on the first pod; the second one's acceptor is killed below (a crash of the
    # data plane itself is another issue's subject), so it carries no load.
    with Loads(pods[:1], "/delay?ms=5", clients=2) as loads:
        loads.progress()
        ops.operator.stop(sig=signal.SIGKILL)
        wait_for(lambda: not any(p.operator_state()["connected"] for p in pods))
        # Without the operator the pods serve, capped; an acceptor that restarts (the process
        # node restarts the container) comes back with its saved config, not unconfigured.
        restarted = pods[1]
        (pid,) = harness.processes_matching(f"{restarted.ip}:{ACCEPTOR_ADMIN}")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: restarted.state()["uptime_seconds"] < 30, timeout=30, what="restarted")
        state = restarted.state()
        assert state["limits"]["maxSessions"] == 2
        assert state["operator"]["generation"] == 1 and not state["operator"]["connected"]
        wait_for(lambda: restarted.registered() == 2, what="sessions re-registered, capped")
        loads.progress(50)
        # A change made while the operator is down is picked up after its restart.
        ops.cluster.apply(sessionslice("web", ns, spec(3)))
        ops.operator.start()
        took = wait_generation(pods, 2, timeout=10)
        print(f"operator restarted (ready) -> fleet on generation 2 in {took:.2f}s")
        wait_for(lambda: [p.registered() for p in pods] == [3, 3], what="3 sessions each")
        loads.progress()
    assert loads.failures() == [{}]

    def right() -> bool:
        status = slice_status(ops.cluster, ns, "web")
        return (
            status.get("observedGeneration") == 2
            and status.get("configuredPods") == 2
            and status.get("registeredSessions") == 6
            and condition(status, "ConfigApplied").get("status") == "True"
        )

    wait_for(right, timeout=10, what="status right again")
