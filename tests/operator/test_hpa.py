"""A SessionSlice's HPA as pure data: what it should be, what to do about the namespace's
live HPAs, and the ScalingActive condition read from what the HPA controller reports."""

from __future__ import annotations

import copy
from typing import Any

from backdial.operator.fleet import Fleet, slice_status
from backdial.operator.hpa import HpaAction, decide, desired_hpa, scaling_condition
from backdial.operator.reconcile import PodInfo, SliceInfo, plan

AUTOSCALING = {
    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
    "minReplicas": 2,
    "maxReplicas": 6,
    "target": {"metric": "requestsWaiting", "averageValue": 4},
    "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}},
}


def hpa(autoscaling: dict[str, Any] | None = AUTOSCALING) -> dict[str, Any] | None:
    return desired_hpa("shop", "web", "uid-1", "backdial.dev/v1alpha1", autoscaling)


def want() -> dict[str, Any]:
    desired = hpa()
    assert desired is not None
    return desired


def live(conditions: list[dict[str, str]] | None = None, **status: Any) -> dict[str, Any]:
    """Our HPA as the API server returns it: defaults added, status from its controller."""
    obj = copy.deepcopy(want())
    obj["metadata"]["resourceVersion"] = "7"
    obj["spec"]["behavior"] = {
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max"},
        "scaleDown": {"selectPolicy": "Max"},
    }
    obj["status"] = {"conditions": conditions or [], **status}
    return obj


def foreign(name: str, target: str = "web", kind: str = "Deployment") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "ownerReferences": []},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
            "maxReplicas": 3,
        },
    }


def test_desired_hpa() -> None:
    h = want()
    assert h["apiVersion"] == "autoscaling/v2" and h["metadata"]["name"] == "web"
    assert h["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert h["spec"]["minReplicas"] == 2 and h["spec"]["maxReplicas"] == 6
    assert h["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "backdial_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": "4"},
            },
        }
    ]
    assert h["spec"]["behavior"] == AUTOSCALING["behavior"]
    util = hpa({**AUTOSCALING, "target": {"metric": "sessionUtilization", "averageValue": 80}})
    assert util is not None
    assert util["spec"]["metrics"][0]["pods"]["metric"]["name"] == "backdial_session_utilization"
    assert hpa(None) is None


def test_decide_create_update_delete_none() -> None:
    assert decide(want(), [], "uid-1").action is HpaAction.CREATE
    # Others' HPAs on other targets do not matter.
    assert decide(want(), [foreign("api", "api")], "uid-1").action is HpaAction.CREATE
    ours = live()
    assert decide(want(), [ours], "uid-1").action is HpaAction.NONE  # defaults ignored
    assert decide(hpa({**AUTOSCALING, "maxReplicas": 9}), [ours], "uid-1").action is (
        HpaAction.UPDATE
    )
    no_behavior = hpa({k: v for k, v in AUTOSCALING.items() if k != "behavior"})
    assert decide(no_behavior, [ours], "uid-1").action is HpaAction.UPDATE
    deleted = decide(None, [ours], "uid-1")
    assert deleted.action is HpaAction.DELETE and deleted.existing is ours
    assert decide(None, [], "uid-1").action is HpaAction.NONE
    # Removing autoscaling never deletes someone else's HPA of that name.
    assert decide(None, [foreign("web")], "uid-1").action is HpaAction.NONE


def test_decide_yields_to_hpas_it_does_not_own() -> None:
    # Same name, not ours: left alone.
    same_name = decide(want(), [foreign("web", "other")], "uid-1")
    assert (same_name.action, same_name.conflicts) == (HpaAction.NONE, ("web",))
    # Another HPA scales our target: ours goes (two HPAs on one target fight) ...
    rival = decide(want(), [live(), foreign("web-hand-made")], "uid-1")
    assert rival.action is HpaAction.DELETE and rival.conflicts == ("web-hand-made",)
    assert rival.existing is not None and rival.ours is None
    # ... and is not created while the rival is there; the API version does not matter.
    old_api = foreign("legacy")
    old_api["spec"]["scaleTargetRef"]["apiVersion"] = "apps/v1beta2"
    assert decide(want(), [old_api], "uid-1").conflicts == ("legacy",)
    assert decide(want(), [foreign("web", kind="StatefulSet")], "uid-1").conflicts == ("web",)
    assert decide(want(), [foreign("sts", kind="StatefulSet")], "uid-1").conflicts == ()


def condition_for(hpas: list[dict[str, Any]]) -> dict[str, str]:
    desired = want()
    return scaling_condition(decide(desired, hpas, "uid-1"), desired)


def test_scaling_condition_follows_the_hpa_controller() -> None:
    assert scaling_condition(decide(None, [], "uid-1"), None)["reason"] == "NoAutoscaling"
    assert condition_for([])["status"] == "Unknown"  # being created
    assert condition_for([live()])["reason"] == "HPAPending"  # no controller report yet
    able = {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale"}
    cannot_scale = condition_for(
        [
            live(
                [
                    {
                        "type": "AbleToScale",
                        "status": "False",
                        "reason": "FailedGetScale",
                        "message": 'deployments/scale.apps "web" not found',
                    }
                ]
            )
        ]
    )
    assert cannot_scale == {
        "type": "ScalingActive",
        "status": "False",
        "reason": "FailedGetScale",
        "message": 'HPA web: deployments/scale.apps "web" not found',
    }
    no_metric = condition_for(
        [
            live(
                [
                    able,
                    {
                        "type": "ScalingActive",
                        "status": "False",
                        "reason": "FailedGetPodsMetric",
                        "message": "unable to get metric backdial_requests_waiting",
                    },
                ]
            )
        ]
    )
    assert (no_metric["status"], no_metric["reason"]) == ("False", "FailedGetPodsMetric")
    scaling = condition_for(
        [
            live(
                [
                    able,
                    {"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound"},
                    {
                        "type": "ScalingLimited",
                        "status": "True",
                        "reason": "TooManyReplicas",
                        "message": "the desired replica count is more than the maximum",
                    },
                ],
                currentReplicas=6,
                desiredReplicas=6,
            )
        ]
    )
    assert (scaling["status"], scaling["reason"]) == ("True", "ValidMetricFound")
    assert "6 replicas, 6 desired" in scaling["message"]
    assert "limited (TooManyReplicas)" in scaling["message"]
    odd = condition_for([live([able, {"type": "ScalingActive", "status": "Unknown"}])])
    assert (odd["status"], odd["reason"]) == ("Unknown", "HPAReported")
    conflict = condition_for([live(), foreign("web-hand-made")])
    assert (conflict["status"], conflict["reason"]) == ("False", "HPAConflict")
    assert "web-hand-made" in conflict["message"] and "Deployment web" in conflict["message"]


def test_status_carries_scaling_active() -> None:
    info = SliceInfo(
        "shop", "web", "uid-1", 3, "2026-01-01T00:00:00Z", {"selector": {}, "capacity": {}}
    )
    pods = [PodInfo("shop", "web-0", "p0", {}, True, False, "127.42.0.2")]
    invalid = plan(info, pods, [info])
    conds = {c["type"]: c for c in slice_status(invalid, Fleet())["conditions"]}
    assert conds["ScalingActive"]["reason"] == "InvalidSpec"
    valid_info = SliceInfo(
        "shop",
        "web",
        "uid-1",
        3,
        "2026-01-01T00:00:00Z",
        {"selector": {}, "capacity": {"sessionsPerPod": 2}, "autoscaling": AUTOSCALING},
    )
    valid = plan(valid_info, pods, [valid_info])
    assert "ScalingActive" not in {
        c["type"] for c in slice_status(valid, Fleet())["conditions"]
    }  # not looked at yet
    scaling = condition_for([])
    conds = {c["type"]: c for c in slice_status(valid, Fleet(), scaling)["conditions"]}
    assert conds["ScalingActive"] == {**scaling, "observedGeneration": 3}
