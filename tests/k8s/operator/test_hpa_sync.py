"""``spec.autoscaling`` becomes an HPA the real API server accepts; removing it removes the HPA."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import harness
import pytest

from backdial.operator.hpa import HpaAction
from backdial.operator.scaling import sync_hpa
from tests.k8s.test_cabundle import requester

pytestmark = pytest.mark.k8s

AUTOSCALING: dict[str, Any] = {
    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
    "minReplicas": 2,
    "maxReplicas": 5,
    "target": {"metric": "requestsWaiting", "averageValue": 4},
    "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}},
}


def test_hpa_follows_the_sessionslice(crds: harness.Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    slice_obj = {
        "apiVersion": "backdial.dev/v1alpha1",
        "kind": "SessionSlice",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "capacity": {"sessionsPerPod": 2},
            "autoscaling": AUTOSCALING,
        },
    }
    resp = crds.api.request(
        "POST", f"/apis/backdial.dev/v1alpha1/namespaces/{ns}/sessionslices", slice_obj
    )
    assert resp.status == 201, resp.text
    uid = resp.json()["metadata"]["uid"]
    request = requester(crds)
    hpa_path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/web"

    def sync(autoscaling: dict[str, Any] | None) -> HpaAction:
        return asyncio.run(sync_hpa(request, ns, "web", uid, "backdial.dev/v1alpha1", autoscaling))

    assert sync(AUTOSCALING) is HpaAction.CREATE
    live = crds.get_json(hpa_path)
    assert live["spec"]["metrics"][0]["pods"]["metric"]["name"] == "backdial_requests_waiting"
    assert live["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "4"
    assert live["metadata"]["ownerReferences"][0]["uid"] == uid
    assert sync(AUTOSCALING) is HpaAction.NONE  # server defaults do not cause rewrites
    wider = copy.deepcopy(AUTOSCALING)
    wider["maxReplicas"] = 8
    wider["target"] = {"metric": "sessionUtilization", "averageValue": 80}
    assert sync(wider) is HpaAction.UPDATE
    live = crds.get_json(hpa_path)
    assert live["spec"]["maxReplicas"] == 8
    assert live["spec"]["metrics"][0]["pods"]["metric"]["name"] == "backdial_session_utilization"
    assert sync(wider) is HpaAction.NONE
    assert sync(None) is HpaAction.DELETE
    assert crds.api.request("GET", hpa_path).status == 404
    assert sync(None) is HpaAction.NONE
    # Someone else's HPA of that name is never touched.
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
    assert sync(AUTOSCALING) is HpaAction.CONFLICT
    assert sync(None) is HpaAction.NONE
    assert crds.get_json(hpa_path)["spec"]["maxReplicas"] == 3
