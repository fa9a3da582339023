"""The operator can die: pods keep serving with their last config, and after its restart
the fleet re-converges and the status is right again."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import (
    OperatorEnv,
    condition,
    sessionslice,
    slice_status,
    wait_generation,
)
from tests.stack.test_stack import Load

pytestmark = pytest.mark.k8s


def spec(per_pod: int) -> dict[str, object]:
    return {"selector": {"matchLabels": {"app": "web"}}, "capacity": {"sessionsPerPod": per_pod}}


def test_killed_operator_leaves_pods_configured_and_reconverges(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    pods = ops.create_pods(ns, ["web-0", "web-1"], {"app": "web"})
    stacks = [ops.start_stack(pod, sessions=4) for pod in pods]
    ops.cluster.apply(sessionslice("web", ns, spec(2)))
    wait_generation(stacks, 1, timeout=5)
    wait_for(lambda: [s.registered() for s in stacks] == [2, 2], what="2 sessions each")
    for stack in stacks:
        stack.wait_serving()

    with Load(stacks[0].port, "/delay?ms=5", clients=2) as load:
        ops.operator.stop(sig=signal.SIGKILL)
        wait_for(lambda: not any(s.operator_state()["connected"] for s in stacks))
        # Without the operator: still serving, still capped, and a restarted acceptor comes
        # back with the saved config rather than unconfigured.
        restarted = stacks[1]
        assert restarted.acceptor is not None
        restarted.acceptor.stop()
        restarted.procs.remove(restarted.acceptor)
        ops.start_acceptor(restarted)
        state = restarted.state()
        assert state["limits"]["maxSessions"] == 2
        assert state["operator"]["generation"] == 1 and not state["operator"]["connected"]
        wait_for(lambda: restarted.registered() == 2, what="services re-registered, capped")
        before = load.total
        wait_for(lambda: load.total > before + 50, what="requests served without the operator")
        # A change made while the operator is down is picked up after its restart.
        ops.cluster.apply(sessionslice("web", ns, spec(3)))
        ops.operator.start()
        took = wait_generation(stacks, 2, timeout=10)
        print(f"operator restarted (ready) -> fleet on generation 2 in {took:.2f}s")
        wait_for(lambda: [s.registered() for s in stacks] == [3, 3], what="3 sessions each")
    assert load.failures() == {}

    def right() -> bool:
        status = slice_status(ops.cluster, ns, "web")
        return (
            status.get("observedGeneration") == 2
            and status.get("configuredPods") == 2
            and status.get("registeredSessions") == 6
            and condition(status, "ConfigApplied").get("status") == "True"
        )

    wait_for(right, timeout=10, what="status right again")
