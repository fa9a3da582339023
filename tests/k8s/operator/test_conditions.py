"""Conflicting and invalid SessionSlices: deterministic outcomes, Degraded with a reason,
Events, no retry storm, pods keep working configs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import OperatorEnv, condition, sessionslice, slice_status

pytestmark = pytest.mark.k8s


def spec(per_pod: int, selector: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": {"app": "web"} if selector is None else selector},
        "capacity": {"sessionsPerPod": per_pod},
        **extra,
    }


def events(ops: OperatorEnv, ns: str, name: str) -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name%3D{name}"
    items: list[dict[str, Any]] = ops.cluster.get_json(path)["items"]
    return items


def test_two_sessionslices_selecting_one_pod(ops: OperatorEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    (pod,) = ops.create_pods(ns, ["web-0"], {"app": "web"})
    stack = ops.start_stack(pod, sessions=4)
    ops.cluster.apply(sessionslice("first", ns, spec(2)))
    wait_for(lambda: stack.operator_state()["owner"] == f"{ns}/first", what="configured by first")
    ops.cluster.apply(sessionslice("second", ns, spec(3, selector={})))  # selects every pod

    def degraded(name: str) -> dict[str, Any]:
        return condition(slice_status(ops.cluster, ns, name), "Degraded")

    for name in ("first", "second"):
        wait_for(lambda name=name: degraded(name).get("reason") == "Conflict", what=name)
        assert degraded(name)["status"] == "True"
        wait_for(
            lambda name=name: any(e["reason"] == "Conflict" for e in events(ops, ns, name)),
            what=f"a Conflict Event on {name}",
        )
    assert f"{ns}/second" in degraded("first")["message"]
    assert f"{ns}/first" in degraded("second")["message"]
    # The older one keeps configuring the pod; the newer one configures none.  (Creation
    # times have one-second resolution; on a tie the name decides, "first" either way.)
    assert stack.operator_state()["owner"] == f"{ns}/first"
    assert stack.state()["limits"]["maxSessions"] == 2
    assert slice_status(ops.cluster, ns, "second")["selectedPods"] == 0
    # Deleting the older one hands the pod to the newer one.
    ops.cluster.kubectl("-n", ns, "delete", "ss", "first")
    wait_for(lambda: stack.state()["limits"]["maxSessions"] == 3, what="configured by second")
    assert stack.operator_state()["owner"] == f"{ns}/second"
    wait_for(lambda: degraded("second").get("status") == "False", what="no conflict any more")


def test_invalid_spec_is_a_permanent_condition(ops: OperatorEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    (pod,) = ops.create_pods(ns, ["web-0"], {"app": "web"})
    stack = ops.start_stack(pod, sessions=3)
    ops.cluster.apply(sessionslice("web", ns, spec(2)))
    wait_for(lambda: stack.operator_state()["generation"] == 1, what="generation 1")
    # Valid for the API server, but the regex does not compile: only Python can tell.
    bad = spec(5, slices=[{"name": "app", "share": 100, "match": {"userAgent": "(unclosed"}}])
    ops.cluster.apply(sessionslice("web", ns, bad))

    def status() -> dict[str, Any]:
        return slice_status(ops.cluster, ns, "web")

    wait_for(lambda: condition(status(), "Degraded").get("reason") == "InvalidSpec")
    cond = condition(status(), "Degraded")
    assert cond["status"] == "True" and "spec.slices.0.match.userAgent" in cond["message"]
    assert condition(status(), "ConfigApplied")["status"] == "False"
    assert status()["observedGeneration"] == 2
    wait_for(lambda: any(e["reason"] == "InvalidSpec" for e in events(ops, ns, "web")))
    # The pod keeps its working config, and the operator does not retry: a new event makes
    # it plan again, with no API write (the status it would write is the one there).
    assert stack.operator_state()["generation"] == 1
    assert stack.state()["limits"]["maxSessions"] == 2
    before = ops.operator.state()
    ops.cluster.kubectl("-n", ns, "annotate", "pod", "web-0", "touched=1")
    wait_for(lambda: ops.operator.state()["recomputes"] > before["recomputes"], what="a replan")
    after = ops.operator.state()

    def writes(state: dict[str, Any]) -> dict[str, int]:  # reads (peering, TLS) go on
        return {v: n for v, n in state["api_requests"].items() if v in ("patch", "post", "put")}

    assert writes(after) == writes(before)
    # Fixing the spec applies it.
    ops.cluster.apply(sessionslice("web", ns, spec(5)))
    wait_for(lambda: stack.operator_state()["generation"] == 3, what="generation 3 applied")
    wait_for(lambda: condition(status(), "Degraded").get("status") == "False")
