"""The operator keeps a SessionSlice's HPA in line with ``spec.autoscaling`` on the real
API server: created, replaced on change, deleted when the section goes, and someone
else's HPA of that name left alone."""

from __future__ import annotations

import copy
import json
from typing import Any

import harness
import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import OperatorEnv

pytestmark = pytest.mark.k8s

AUTOSCALING: dict[str, Any] = {
    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
    "minReplicas": 2,
    "maxReplicas": 5,
    "target": {"metric": "requestsWaiting", "averageValue": 4},
    "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}},
}


def test_hpa_follows_the_sessionslice(
    ops: OperatorEnv, crds: harness.Cluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    slices = f"/apis/backdial.dev/v1alpha1/namespaces/{ns}/sessionslices"
    hpa_path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/web"

    def hpa() -> dict[str, Any] | None:
        resp = crds.api.request("GET", hpa_path)
        return resp.json() if resp.status == 200 else None

    def patch(spec: dict[str, Any]) -> None:
        resp = crds.api.request(
            "PATCH",
            f"{slices}/web",
            {"spec": spec},
            content_type="application/merge-patch+json",
        )
        assert resp.status == 200, resp.text

    body = {
        "apiVersion": "backdial.dev/v1alpha1",
        "kind": "SessionSlice",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "capacity": {"sessionsPerPod": 2},
            "autoscaling": AUTOSCALING,
        },
    }
    resp = crds.api.request("POST", slices, body)
    assert resp.status == 201, resp.text
    uid = resp.json()["metadata"]["uid"]
    wait_for(lambda: hpa() is not None, timeout=20, what="HPA created")
    live = hpa()
    assert live is not None
    metric = live["spec"]["metrics"][0]["pods"]
    assert metric == {
        "metric": {"name": "backdial_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "4"},
    }
    assert live["metadata"]["ownerReferences"][0]["uid"] == uid
    assert live["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0

    wider = copy.deepcopy(AUTOSCALING)
    wider["maxReplicas"] = 8
    wider["target"] = {"metric": "sessionUtilization", "averageValue": 80}
    patch({"autoscaling": wider})

    def updated() -> bool:
        h = hpa()
        return h is not None and h["spec"]["maxReplicas"] == 8

    wait_for(updated, timeout=20, what="HPA replaced")
    live = hpa()
    assert live is not None
    assert live["spec"]["metrics"][0]["pods"]["metric"]["name"] == "backdial_session_utilization"

    patch({"autoscaling": None})
    wait_for(lambda: hpa() is None, timeout=20, what="HPA deleted")

    # Someone else's HPA of that name is never touched, even when autoscaling comes back.
    foreign = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "maxReplicas": 3,
        },
    }
    resp = crds.api.request(
        "POST", f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers", foreign
    )
    assert resp.status == 201, resp.text
    patch({"autoscaling": AUTOSCALING})
    generation = crds.get_json(f"{slices}/web")["metadata"]["generation"]
    wait_for(
        lambda: (
            crds.get_json(f"{slices}/web").get("status", {}).get("observedGeneration") == generation
        ),
        timeout=20,
        what="new generation reconciled",
    )
    wait_for(
        lambda: "is not owned by its SessionSlice" in ops.operator.output(),
        timeout=20,
        what="conflict logged",
    )
    live = hpa()
    assert live is not None and live["spec"]["maxReplicas"] == 3, json.dumps(live)
    assert not live["metadata"].get("ownerReferences")
