"""Smoke tests proving the local control plane (e2e/cluster) is a real Kubernetes.

They exercise the pieces backdial's operator and sidecar rely on: the scheduler and the
controller-manager turning a Deployment into Running pods (on a kwok fake node), structural
schema validation of a CRD by the API server, RBAC for an impersonated ServiceAccount, the HPA
controller posting status, the aggregation layer's configuration, and helm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import harness
import pytest
import yaml

pytestmark = pytest.mark.k8s

POD_IMAGE = "registry.k8s.io/pause:3.10"  # never pulled: kwok only fakes the containers


def _deployment(name: str, namespace: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": POD_IMAGE,
                            "resources": {"requests": {"cpu": "100m", "memory": "16Mi"}},
                        }
                    ]
                },
            },
        },
    }


def _running_pods(cluster: harness.Cluster, namespace: str, app: str, count: int) -> Any:
    """Poll until ``count`` pods labelled ``app`` are Running and Ready; return them."""

    def probe() -> list[dict[str, Any]] | None:
        pods = cluster.get_json(f"/api/v1/namespaces/{namespace}/pods?labelSelector=app%3D{app}")
        running = [
            pod
            for pod in pods["items"]
            if pod.get("status", {}).get("phase") == "Running"
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in pod["status"].get("conditions", [])
            )
        ]
        return running if len(running) == count else None

    return harness.poll(probe, timeout=60, interval=0.5, what=f"{count} Running pods of {app}")


def test_versions(k8s_cluster: harness.Cluster) -> None:
    """kubectl, the API server and helm all run the versions build.sh built."""
    versions = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    server = versions["serverVersion"]["gitVersion"]
    assert server.startswith("v1.")
    assert server == versions["clientVersion"]["gitVersion"]
    assert k8s_cluster.helm("version", "--short").stdout.startswith("v3.")


def test_deployment_pods_become_running(k8s_cluster: harness.Cluster, k8s_namespace: str) -> None:
    """Controller-manager makes pods, the scheduler binds them, kwok makes them Running."""
    k8s_cluster.apply(_deployment("web", k8s_namespace, replicas=2))
    pods = _running_pods(k8s_cluster, k8s_namespace, "web", 2)
    assert {pod["spec"]["nodeName"] for pod in pods} <= set(k8s_cluster.node_names)
    for pod in pods:
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
        scheduled = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert scheduled and scheduled[0]["status"] == "True"

    def available() -> int | None:
        deployment = k8s_cluster.get_json(
            f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments/web"
        )
        replicas = deployment.get("status", {}).get("availableReplicas")
        return replicas if replicas == 2 else None

    assert harness.poll(available, timeout=60, what="deployment web available") == 2
    out = k8s_cluster.kubectl(
        "-n", k8s_namespace, "rollout", "status", "deployment/web", "--timeout=30s"
    ).stdout
    assert "successfully rolled out" in out


CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.backdial.dev
spec:
  group: e2e.backdial.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          required: [spec]
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
                color: {type: string, enum: [red, blue]}
"""


def test_crd_structural_schema_is_enforced(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """The API server validates custom resources against the CRD's structural schema."""
    k8s_cluster.apply(CRD)
    try:
        k8s_cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=30s", "crd/widgets.e2e.backdial.dev"
        )
        path = f"/apis/e2e.backdial.dev/v1/namespaces/{k8s_namespace}/widgets"

        def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
            return {
                "apiVersion": "e2e.backdial.dev/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": spec,
            }

        def create_valid() -> harness.ApiResponse | None:
            response = k8s_cluster.api.request("POST", path, widget("ok", {"size": 3}))
            return None if response.status == 404 else response  # handler not yet installed

        created = harness.poll(create_valid, timeout=30, what="the Widget endpoint")
        assert created.status == 201, created.text

        wrong_type = k8s_cluster.api.request("POST", path, widget("bad1", {"size": "big"}))
        assert wrong_type.status == 422, wrong_type.text
        body = wrong_type.json()
        assert body["reason"] == "Invalid"
        assert any(c.get("field") == "spec.size" for c in body["details"]["causes"])

        missing = k8s_cluster.api.request("POST", path, widget("bad2", {"color": "red"}))
        assert missing.status == 422, missing.text
        assert "Required value" in missing.json()["message"]

        bad_enum = k8s_cluster.api.request(
            "POST", path, widget("bad3", {"size": 1, "color": "green"})
        )
        assert bad_enum.status == 422, bad_enum.text
    finally:
        k8s_cluster.kubectl("delete", "crd", "widgets.e2e.backdial.dev", "--wait=false")


def test_rbac_for_impersonated_service_account(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """A ServiceAccount may do what its Role grants (200) and nothing else (403)."""
    ns = k8s_namespace
    k8s_cluster.apply(
        harness.service_account_with_role(
            ns,
            "reader",
            "configmap-reader",
            [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
        )
    )
    user = f"system:serviceaccount:{ns}:reader"
    configmaps = f"/api/v1/namespaces/{ns}/configmaps"

    def allowed() -> harness.ApiResponse | None:
        response = k8s_cluster.api.request("GET", configmaps, impersonate_user=user)
        return response if response.status == 200 else None  # RBAC caches catch up

    assert harness.poll(allowed, timeout=30, what="RBAC to allow listing configmaps")

    create = k8s_cluster.api.request(
        "POST",
        configmaps,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nope"}},
        impersonate_user=user,
    )
    assert create.status == 403, create.text
    assert create.json()["reason"] == "Forbidden"
    secrets = k8s_cluster.api.request(
        "GET", f"/api/v1/namespaces/{ns}/secrets", impersonate_user=user
    )
    assert secrets.status == 403, secrets.text

    # The same through kubectl --as.
    assert k8s_cluster.kubectl("-n", ns, "get", "configmaps", as_user=user).returncode == 0
    denied = k8s_cluster.kubectl("-n", ns, "create", "configmap", "nope", as_user=user, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    can_i = k8s_cluster.kubectl(
        "-n", ns, "auth", "can-i", "delete", "configmaps", as_user=user, check=False
    )
    assert can_i.stdout.strip() == "no"


def test_hpa_status_is_posted_by_controller_manager(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """An autoscaling/v2 HPA is accepted and the HPA controller reports on its target."""
    k8s_cluster.apply(_deployment("scaled", k8s_namespace, replicas=2))
    _running_pods(k8s_cluster, k8s_namespace, "scaled", 2)
    k8s_cluster.apply(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "scaled", "namespace": k8s_namespace},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 50},
                        },
                    }
                ],
            },
        }
    )
    path = f"/apis/autoscaling/v2/namespaces/{k8s_namespace}/horizontalpodautoscalers/scaled"

    def status_posted() -> dict[str, Any] | None:
        status: dict[str, Any] = k8s_cluster.get_json(path).get("status", {})
        types = {c.get("type") for c in status.get("conditions") or []}
        return status if {"AbleToScale", "ScalingActive"} <= types else None

    status = harness.poll(status_posted, timeout=90, interval=1, what="HPA status conditions")
    assert status["currentReplicas"] == 2
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["AbleToScale"]["status"] == "True"
    # No metrics API is served, so the controller reports that it cannot get CPU metrics.
    assert conditions["ScalingActive"]["status"] == "False"


def test_aggregation_layer_is_configured(k8s_cluster: harness.Cluster) -> None:
    """kube-aggregator serves APIServices and publishes the front-proxy CA for extensions."""
    services = k8s_cluster.get_json("/apis/apiregistration.k8s.io/v1/apiservices")
    names = {item["metadata"]["name"] for item in services["items"]}
    assert {"v1.", "v1.apps", "v2.autoscaling"} <= names
    auth = k8s_cluster.get_json(
        "/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication"
    )
    assert "requestheader-client-ca-file" in auth["data"]
    assert json.loads(auth["data"]["requestheader-allowed-names"]) == ["front-proxy-client"]


def test_helm_installs_a_chart(
    k8s_cluster: harness.Cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    """The built helm installs a (locally generated) chart into the cluster."""
    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v2", "name": "smoke", "version": "0.1.0"})
    )
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    k8s_cluster.helm(
        "install",
        "smoke",
        str(chart),
        "-n",
        k8s_namespace,
        "--set",
        "greeting=hi",
        "--wait",
        "--timeout",
        "60s",
    )
    cm = k8s_cluster.get_json(f"/api/v1/namespaces/{k8s_namespace}/configmaps/smoke-cm")
    assert cm["data"] == {"greeting": "hi"}
    releases = json.loads(k8s_cluster.helm("list", "-n", k8s_namespace, "-o", "json").stdout)
    assert [r["status"] for r in releases] == ["deployed"]
    k8s_cluster.helm("uninstall", "smoke", "-n", k8s_namespace, "--wait", "--timeout", "60s")
