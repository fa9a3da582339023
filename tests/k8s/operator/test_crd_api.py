"""The API server enforces the generated SessionSlice schema: defaults, CEL, 422s."""

from __future__ import annotations

import json
from typing import Any

import harness
import pytest

pytestmark = pytest.mark.k8s


def _obj(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "backdial.dev/v1alpha1",
        "kind": "SessionSlice",
        "metadata": {"name": name},
        "spec": spec,
    }


def _spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "web"}},
        "capacity": {"sessionsPerPod": 3},
        "slices": [
            {"name": "mobile", "match": {"userAgent": "(?i)android"}, "share": 25},
            {"name": "default", "share": 75, "queue": {"maxWaiting": 10, "timeout": "2s"}},
        ],
    }
    base.update(over)
    return base


def _post(cluster: harness.Cluster, ns: str, body: dict[str, Any]) -> harness.ApiResponse:
    path = f"/apis/backdial.dev/v1alpha1/namespaces/{ns}/sessionslices?fieldValidation=Strict"
    return cluster.api.request("POST", path, body)


def test_valid_objects_are_accepted_and_defaulted(
    crds: harness.Cluster, k8s_namespace: str
) -> None:
    created = _post(crds, k8s_namespace, _obj("web", _spec()))
    assert created.status == 201, created.text
    spec = created.json()["spec"]
    mobile = spec["slices"][0]
    assert mobile["borrow"] is True  # defaults from the models
    assert spec["slices"][1]["queue"] == {"maxWaiting": 10, "timeout": "2s"}
    full = _spec(
        capacity={"sessionsPerPod": 8, "totalSessions": 20},
        limits={"leasePrefetch": 2, "preambleTimeout": "500ms"},
        autoscaling={
            "scaleTargetRef": {"name": "web"},
            "maxReplicas": 5,
            "target": {"metric": "requestsWaiting", "averageValue": 4},
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 10}},
        },
    )
    full["selector"] = {"matchExpressions": [{"key": "app", "operator": "Exists"}]}
    created = _post(crds, k8s_namespace, _obj("full", full))
    assert created.status == 201, created.text
    got = created.json()["spec"]
    assert got["limits"]["leaseIdleRelease"] == "2s" and got["limits"]["retryAfter"] == 1
    assert got["autoscaling"]["minReplicas"] == 1
    assert got["autoscaling"]["scaleTargetRef"]["kind"] == "Deployment"
    assert got["autoscaling"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 10}}
    # kubectl knows the short name and the printer columns.
    table = crds.kubectl("-n", k8s_namespace, "get", "ss").stdout.splitlines()
    assert table[0].split() == ["NAME", "PODS", "SESSIONS", "WAITING", "READY", "AGE"]
    assert sorted(line.split()[0] for line in table[1:]) == ["full", "web"]


INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "shares",
        _spec(
            slices=[
                {"name": "a", "share": 60, "match": {"pathPrefixes": ["/a"]}},
                {"name": "b", "share": 50},
            ]
        ),
        "spec.slices",
        "shares must add up to at most 100",
    ),
    (
        "dupnames",
        _spec(
            slices=[
                {"name": "a", "share": 10, "match": {"pathPrefixes": ["/a"]}},
                {"name": "a", "share": 10},
            ]
        ),
        "spec.slices[1]",
        "Duplicate value",
    ),
    (
        "twodefaults",
        _spec(slices=[{"name": "a", "share": 10}, {"name": "b", "share": 10}]),
        "spec.slices",
        "at most one slice may have no match",
    ),
    (
        "duration",
        _spec(slices=[{"name": "d", "share": 100, "queue": {"timeout": "2 seconds"}}]),
        "spec.slices[0].queue.timeout",
        "must be a duration",
    ),
    ("cap", _spec(capacity={"sessionsPerPod": 0}), "spec.capacity.sessionsPerPod", "greater"),
    ("nocap", _spec(capacity={}), "spec.capacity.sessionsPerPod", "Required value"),
    (
        "maxsessions",
        _spec(limits={"maxSessions": 5}),
        "spec.limits.maxSessions",
        "use capacity.sessionsPerPod",
    ),
    (
        "name",
        _spec(slices=[{"name": "Mobile!", "share": 100}]),
        "spec.slices[0].name",
        "should match",
    ),
    (
        "replicas",
        _spec(
            autoscaling={
                "scaleTargetRef": {"name": "web"},
                "minReplicas": 5,
                "maxReplicas": 2,
                "target": {"metric": "sessionUtilization", "averageValue": 80},
            }
        ),
        "spec.autoscaling",
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "selector",
        _spec(selector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
        "spec.selector.matchExpressions[0]",
        "In and NotIn need values",
    ),
]


@pytest.mark.parametrize(("name", "spec", "field", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_objects_are_refused_naming_the_field(
    crds: harness.Cluster,
    k8s_namespace: str,
    name: str,
    spec: dict[str, Any],
    field: str,
    message: str,
) -> None:
    refused = _post(crds, k8s_namespace, _obj(name, spec))
    assert refused.status == 422, refused.text
    body = refused.json()
    causes = body["details"]["causes"]
    assert any(c.get("field") == field for c in causes), json.dumps(causes)
    assert message in body["message"], body["message"]
