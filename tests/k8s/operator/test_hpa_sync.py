"""The operator keeps a SessionSlice's HPA in line with ``spec.autoscaling`` on the real
API server, with the real HPA controller: created, replaced on change, back at once when
deleted by hand, deleted when the section goes; ``ScalingActive`` says what the HPA
controller says; an HPA someone else owns on the same target is a conflict (condition and
Event), and the operator yields to it."""

from __future__ import annotations

import copy
import json
import urllib.parse
from typing import Any

import harness
import pytest

from tests.helpers import wait_for
from tests.k8s.operator.opstack import OperatorEnv, condition, slice_status

pytestmark = pytest.mark.k8s

AUTOSCALING: dict[str, Any] = {
    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
    "minReplicas": 2,
    "maxReplicas": 5,
    "target": {"metric": "requestsWaiting", "averageValue": 4},
    "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}},
}


class Hpas:
    def __init__(self, cluster: harness.Cluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns
        self.base = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers"
        self.slices = f"/apis/backdial.dev/v1alpha1/namespaces/{ns}/sessionslices"

    def get(self, name: str = "web") -> dict[str, Any] | None:
        resp = self.cluster.api.request("GET", f"{self.base}/{name}")
        return resp.json() if resp.status == 200 else None

    def patch_slice(self, spec: dict[str, Any]) -> None:
        resp = self.cluster.api.request(
            "PATCH",
            f"{self.slices}/web",
            {"spec": spec},
            content_type="application/merge-patch+json",
        )
        assert resp.status == 200, resp.text

    def scaling(self) -> dict[str, Any]:
        return condition(slice_status(self.cluster, self.ns, "web"), "ScalingActive")

    def wait_scaling(self, reason: str, status: str, timeout: float = 30) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> bool:
            last.clear()
            last.update(self.scaling())
            return (last.get("reason"), last.get("status")) == (reason, status)

        try:
            wait_for(reached, timeout=timeout, what=f"ScalingActive {status} {reason}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {json.dumps(last)}") from None
        return last

    def events(self, reason: str) -> list[dict[str, Any]]:
        query = urllib.parse.quote(f"involvedObject.name=web,reason={reason}")
        items: list[dict[str, Any]] = self.cluster.get_json(
            f"/api/v1/namespaces/{self.ns}/events?fieldSelector={query}"
        )["items"]
        return items


def _controller_says(h: dict[str, Any] | None) -> tuple[str, str] | None:
    """(status, reason) the HPA controller reports: the first of AbleToScale, ScalingActive
    that is not True, else ScalingActive."""
    conds = {c["type"]: c for c in ((h or {}).get("status") or {}).get("conditions") or []}
    for kind in ("AbleToScale", "ScalingActive"):
        if kind in conds and conds[kind]["status"] != "True":
            return conds[kind]["status"], conds[kind]["reason"]
    active = conds.get("ScalingActive")
    return (active["status"], active["reason"]) if active else None


def _deployment(ns: str) -> dict[str, Any]:
    labels = {"app": "web"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
            },
        },
    }


def _hand_made(name: str, ns: str, target: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "maxReplicas": 3,
        },
    }


def test_hpa_follows_the_sessionslice_and_the_hpa_controller(
    ops: OperatorEnv, crds: harness.Cluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    hpas = Hpas(crds, ns)
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
    resp = crds.api.request("POST", hpas.slices, body)
    assert resp.status == 201, resp.text
    uid = resp.json()["metadata"]["uid"]
    wait_for(lambda: hpas.get() is not None, timeout=20, what="HPA created")
    live = hpas.get()
    assert live is not None
    assert live["spec"]["metrics"][0]["pods"] == {
        "metric": {"name": "backdial_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "4"},
    }
    assert live["metadata"]["ownerReferences"][0]["uid"] == uid
    assert live["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0

    # ScalingActive is what the real HPA controller reports: no Deployment yet ...
    hpas.wait_scaling("FailedGetScale", "False")
    # ... and, once the Deployment exists, whatever the controller says next.
    crds.apply(_deployment(ns))

    def follows() -> bool:
        says = _controller_says(hpas.get())
        scaling = hpas.scaling()
        return (
            says is not None
            and says[1] != "FailedGetScale"
            and (scaling.get("status"), scaling.get("reason")) == says
        )

    wait_for(follows, timeout=45, what="ScalingActive to follow the HPA controller")

    # Deleted by hand: back at once, without a spec change.
    generation = crds.get_json(f"{hpas.slices}/web")["metadata"]["generation"]
    old_uid = live["metadata"]["uid"]
    resp = crds.api.request("DELETE", f"{hpas.base}/web")
    assert resp.status == 200, resp.text
    wait_for(
        lambda: (h := hpas.get()) is not None and h["metadata"]["uid"] != old_uid,
        timeout=20,
        what="the deleted HPA to come back",
    )
    assert crds.get_json(f"{hpas.slices}/web")["metadata"]["generation"] == generation

    # Someone else's HPA on the same Deployment: the operator yields (condition + Event) ...
    resp = crds.api.request("POST", hpas.base, _hand_made("web-by-hand", ns))
    assert resp.status == 201, resp.text
    conflict = hpas.wait_scaling("HPAConflict", "False")
    assert "web-by-hand" in conflict["message"] and "Deployment web" in conflict["message"]
    wait_for(lambda: hpas.get() is None, timeout=20, what="the operator's HPA to step aside")
    wait_for(lambda: bool(hpas.events("HPAConflict")), timeout=20, what="an HPAConflict Event")
    (event,) = hpas.events("HPAConflict")
    assert event["type"] == "Warning" and "web-by-hand" in event["message"]
    # ... and takes over again once it is gone.
    assert crds.api.request("DELETE", f"{hpas.base}/web-by-hand").status == 200
    wait_for(lambda: hpas.get() is not None, timeout=20, what="the operator's HPA back")
    wait_for(lambda: hpas.scaling().get("reason") != "HPAConflict", timeout=20, what="no conflict")

    wider = copy.deepcopy(AUTOSCALING)
    wider["maxReplicas"] = 8
    wider["target"] = {"metric": "sessionUtilization", "averageValue": 80}
    hpas.patch_slice({"autoscaling": wider})
    wait_for(
        lambda: (h := hpas.get()) is not None and h["spec"]["maxReplicas"] == 8,
        timeout=20,
        what="HPA replaced",
    )
    live = hpas.get()
    assert live is not None
    assert live["spec"]["metrics"][0]["pods"]["metric"]["name"] == "backdial_session_utilization"

    hpas.patch_slice({"autoscaling": None})
    wait_for(lambda: hpas.get() is None, timeout=20, what="HPA deleted")
    hpas.wait_scaling("NoAutoscaling", "False")

    # Someone else's HPA of that name is never touched, even when autoscaling comes back.
    resp = crds.api.request("POST", hpas.base, _hand_made("web", ns, target="other"))
    assert resp.status == 201, resp.text
    hpas.patch_slice({"autoscaling": AUTOSCALING})
    conflict = hpas.wait_scaling("HPAConflict", "False")
    assert "HorizontalPodAutoscaler web " in conflict["message"]
    wait_for(lambda: len(hpas.events("HPAConflict")) == 2, timeout=20, what="a second Event")
    live = hpas.get()
    assert live is not None and live["spec"]["maxReplicas"] == 3, json.dumps(live)
    assert not live["metadata"].get("ownerReferences")
