"""The Helm chart: lint, values schema, what each switch renders, and the real API server's
verdict on every rendered object (server-side dry run) for several values combinations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import pytest
import yaml

from backdial.operator import rbac
from backdial.operator.injectsettings import InjectSettings, settings_from_data
from backdial.operator.role import ACTIVE, ROLE_LABEL
from backdial.operator.webhookconfig import api_services, webhook_configuration
from tests.k8s.chart.certmanager_crds import CRDS as CERT_MANAGER_CRDS
from tests.k8s.chart.chartlib import CHART, COMBOS, KUBE_VERSION, find, render, values_file

pytestmark = pytest.mark.k8s


def _kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_helm_lint_strict(k8s_cluster: harness.Cluster, combo: str, tmp_path: Path) -> None:
    done = k8s_cluster.helm(
        "lint",
        "--strict",
        str(CHART),
        "--values",
        str(values_file(COMBOS[combo], tmp_path)),
        "--kube-version",
        KUBE_VERSION,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"image": {"tagg": "1"}}, "'tagg' not allowed"),
        ({"surprise": True}, "'surprise' not allowed"),
        ({"operator": {"replicaCount": 0}}, "/operator/replicaCount"),
        ({"operator": {"ports": {"config": 70000}}}, "/operator/ports/config"),
        ({"crds": {"keep": "yes"}}, "/crds/keep"),
        ({"certManager": {"issuerRef": {"kind": "ClusterIssuer"}}}, "/certManager/issuerRef"),
        ({"certManager": {"duration": "90d"}}, "/certManager/duration"),
        ({"inject": {"portName": "HTTP"}}, "/inject/portName"),
        ({"inject": {"acceptorResources": {"requests": {"gpu": "1"}}}}, "'gpu' not allowed"),
        ({"inject": {"sidecarWorkers": 0}}, "/inject/sidecarWorkers"),
        ({"operator": {"tolerations": [{"effect": "Never"}]}}, "/operator/tolerations/0/effect"),
        ({"operator": {"securityContext": {"privileged": "no"}}}, "privileged"),
    ],
    ids=lambda v: json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else "",
)
def test_values_schema_refuses_bad_values(
    k8s_cluster: harness.Cluster, values: dict[str, Any], complaint: str, tmp_path: Path
) -> None:
    done = k8s_cluster.helm(
        "template",
        "x",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--values",
        str(values_file(values, tmp_path)),
        check=False,
    )
    assert done.returncode != 0
    assert complaint in done.stderr, done.stderr


def test_switches_render_the_right_objects(k8s_cluster: harness.Cluster) -> None:
    ns = "backdial-system"
    defaults = render(k8s_cluster, {}, ns)
    assert _kinds(defaults) == [
        "APIService/v1beta1.custom.metrics.k8s.io",
        "APIService/v1beta2.custom.metrics.k8s.io",
        "ClusterRole/backdial-operator",
        "ClusterRoleBinding/backdial-operator",
        "ClusterRoleBinding/backdial-operator:system:auth-delegator",
        "ConfigMap/backdial-inject",
        "CustomResourceDefinition/clusterkopfpeerings.kopf.dev",
        "CustomResourceDefinition/sessionslices.backdial.dev",
        "Deployment/backdial-operator",
        "MutatingWebhookConfiguration/backdial-injector",
        "PodDisruptionBudget/backdial-operator",
        "Role/backdial-operator",
        "RoleBinding/backdial-operator",
        "RoleBinding/backdial-operator:extension-apiserver-authentication-reader",
        "Service/backdial-metrics-api",
        "Service/backdial-operator",
        "Service/backdial-webhook",
        "ServiceAccount/backdial-operator",
    ]
    crd = find(defaults, "CustomResourceDefinition", "sessionslices.backdial.dev")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    deployment = find(defaults, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "ghcr.io/backdial/backdial:0.1.0"  # appVersion
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

    unkept = render(k8s_cluster, {"crds": {"keep": False}}, ns)
    crd = find(unkept, "CustomResourceDefinition", "sessionslices.backdial.dev")
    assert "annotations" not in crd["metadata"]
    assert not [o for o in render(k8s_cluster, COMBOS["crds-off"], ns) if "Definition" in o["kind"]]

    minimal = _kinds(render(k8s_cluster, COMBOS["minimal"], ns))
    assert minimal == [
        "ClusterRole/backdial-operator",
        "ClusterRoleBinding/backdial-operator",
        "ConfigMap/backdial-inject",
        "Deployment/backdial-operator",
        "Role/backdial-operator",
        "RoleBinding/backdial-operator",
        "Service/backdial-operator",
    ]

    managed = render(k8s_cluster, COMBOS["cert-manager"], ns)
    names = _kinds(managed)
    for kind in ("Issuer/backdial-selfsigned", "Certificate/backdial-ca", "Issuer/backdial-ca"):
        assert kind in names
    # No Secret access (the TLS files are mounted); the acting replica still labels its pod.
    assert find(managed, "Role", "backdial-operator")["rules"] == rbac.NAMESPACE_RULES
    cert = find(managed, "Certificate", "backdial-operator-tls")
    assert set(cert["spec"]["dnsNames"]) == {
        f"{svc}.{ns}.svc{suffix}"
        for svc in ("backdial-operator", "backdial-webhook", "backdial-metrics-api")
        for suffix in ("", ".cluster.local")
    }
    inject_from = f"{ns}/backdial-operator-tls"
    for kind in ("MutatingWebhookConfiguration", "APIService"):
        for obj in (o for o in managed if o["kind"] == kind):
            assert obj["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == inject_from
    rules = find(managed, "ClusterRole")["rules"]
    assert not [r for r in rules if "apiservices" in r["resources"]]
    args = find(managed, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tls-dir=/etc/backdial/tls" in args

    corp = render(k8s_cluster, COMBOS["cert-manager-cluster-issuer"], ns)
    assert "Issuer/backdial-selfsigned" not in _kinds(corp)
    assert find(corp, "Certificate")["spec"]["issuerRef"]["kind"] == "ClusterIssuer"


def test_chart_objects_mirror_the_operator(k8s_cluster: harness.Cluster) -> None:
    """The webhook configuration and the APIServices are the operator's, field by field."""
    ns = "backdial-system"
    objs = render(k8s_cluster, {}, ns)
    assert (
        find(objs, "MutatingWebhookConfiguration")["webhooks"]
        == (webhook_configuration(ns)["webhooks"])
    )
    for want in api_services(ns):
        assert find(objs, "APIService", want["metadata"]["name"])["spec"] == want["spec"]

    excluded = render(k8s_cluster, {"webhook": {"excludeNamespaces": ["legacy"]}}, ns)
    for hook in find(excluded, "MutatingWebhookConfiguration")["webhooks"]:
        values = hook["namespaceSelector"]["matchExpressions"][0]["values"]
        assert values == ["kube-system", "kube-public", "kube-node-lease", ns, "legacy"]


def test_rbac_is_the_operators(k8s_cluster: harness.Cluster) -> None:
    """The ClusterRole and the Role hold exactly the operator's generated rules (the CA
    bundle rules only with the self-managed CA)."""
    objs = render(k8s_cluster, {}, "ops")
    assert find(objs, "ClusterRole", "backdial-operator")["rules"] == (
        rbac.CLUSTER_RULES + rbac.CA_BUNDLE_RULES
    )
    assert find(objs, "Role", "backdial-operator")["rules"] == (
        rbac.NAMESPACE_RULES + rbac.SECRET_RULES
    )
    subject = {"kind": "ServiceAccount", "name": rbac.SERVICE_ACCOUNT, "namespace": "ops"}
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        assert find(objs, kind, "backdial-operator")["subjects"] == [subject]


def test_services_route_the_webhook_to_every_replica_the_rest_to_the_acting_one(
    k8s_cluster: harness.Cluster,
) -> None:
    objs = render(k8s_cluster, {}, "ops")
    pods = find(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objs if o["kind"] == "Service"]
    selectors = {o["metadata"]["name"]: o["spec"]["selector"] for o in services}
    assert selectors["backdial-webhook"] == pods
    acting = {**pods, ROLE_LABEL: ACTIVE}
    assert selectors["backdial-operator"] == acting == selectors["backdial-metrics-api"]
    env = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    pod_name = {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {"name": "BACKDIAL_POD_NAME", "valueFrom": pod_name} in env  # --pod-name


def _inject_settings(objs: list[dict[str, Any]]) -> InjectSettings:
    data = yaml.safe_load(find(objs, "ConfigMap", "backdial-inject")["data"]["inject.yaml"])
    return settings_from_data(data, "chart ConfigMap")


def test_inject_values_are_the_operators_settings(k8s_cluster: harness.Cluster) -> None:
    """Documented defaults equal the operator's own; every value reaches the operator."""
    defaults = _inject_settings(render(k8s_cluster, {}, "ops"))
    assert defaults == InjectSettings().model_copy(
        update={
            "image": "ghcr.io/backdial/backdial:0.1.0",
            "operator_url": "https://backdial-operator.ops.svc:8444",
        }
    )
    everything = _inject_settings(render(k8s_cluster, COMBOS["everything"], "ops"))
    want = dict(COMBOS["everything"]["inject"])
    image = want.pop("image")
    assert everything.image == f"{image['repository']}:{image['tag']}"
    assert everything.image_pull_policy.value == image["pullPolicy"]
    dumped = everything.model_dump(by_alias=True, mode="json")
    for key, value in want.items():
        if key == "drainQuietPeriod":
            assert everything.drain_quiet_period == 2.5
        elif key.endswith("Resources"):
            assert {k: v for k, v in dumped[key].items() if v} == value, key
        else:
            assert dumped[key] == value, key


@pytest.fixture(scope="module")
def cert_manager_crds(k8s_cluster: harness.Cluster) -> Iterator[None]:
    k8s_cluster.apply(CERT_MANAGER_CRDS)
    for crd in CERT_MANAGER_CRDS:
        k8s_cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}"
        )
    yield


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_rendered_objects_pass_server_side_dry_run(
    k8s_cluster: harness.Cluster, k8s_namespace: str, cert_manager_crds: None, combo: str
) -> None:
    objs = render(k8s_cluster, COMBOS[combo], k8s_namespace)
    done = k8s_cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=chart-dry-run",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(objs),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    accepted = [line for line in done.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(objs), done.stdout


def test_dry_run_refuses_a_broken_object(
    k8s_cluster: harness.Cluster, k8s_namespace: str, cert_manager_crds: None
) -> None:
    """The dry run judges: a misspelt Certificate field and a bad Deployment are refused."""
    objs = render(k8s_cluster, COMBOS["cert-manager"], k8s_namespace)
    cert = find(objs, "Certificate", "backdial-operator-tls")
    cert["spec"]["dnsNamez"] = cert["spec"].pop("dnsNames")
    deployment = find(objs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 0
    for broken in (cert, deployment):
        done = k8s_cluster.kubectl(
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            "-",
            input=yaml.safe_dump(broken),
            check=False,
        )
        assert done.returncode != 0, done.stdout
