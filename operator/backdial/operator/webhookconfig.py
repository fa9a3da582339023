"""How the API server reaches the operator: the webhook configuration and the APIServices.

``webhook_configuration``: who is sent to the webhook, and what happens if it is down.
``api_services``: the two ``custom.metrics.k8s.io`` APIServices (v1beta2 preferred,
v1beta1 for HPA controllers that ask for it) pointing at Service
``backdial-metrics-api``.  The chart renders the same objects; ``caBundle`` is patched
in at run time (``cabundle.py``) or by cert-manager's CA injector.

Two webhooks in one configuration, because a namespace opt-in OR a pod opt-in
cannot be one selector (namespaceSelector AND objectSelector must both match):

* ``namespace.inject.backdial.dev``: namespaces labelled
  ``backdial.dev/inject=enabled``, pods not labelled ``backdial.dev/inject=false``;
* ``pod.inject.backdial.dev``: pods labelled ``backdial.dev/inject=true`` in
  any other namespace.

A pod labelled ``"false"`` matches neither.  Both exclude the control-plane
namespaces and the operator's own, so the operator can always be (re)started
while its webhook is down.

``failurePolicy: Fail`` (deliberate, docs/operator.md "Injection"): an opted-in
pod created while no operator replica answers is refused, and its controller
retries until the operator is back.  ``Ignore`` would start it without the
acceptor and sidecar: Running, but with nothing listening on its traffic port
and an app that cannot register.  The blast radius is bounded by the opt-in
selectors, ``timeoutSeconds`` keeps a slow operator from stalling the API
server's admission chain, and CREATE of pods is the only operation sent.
"""

from __future__ import annotations

import base64
from typing import Any

from backdial.operator.injectsettings import INJECT_LABEL, NAMESPACE_ENABLED

CONFIG_NAME = "backdial-injector"
WEBHOOK_NAMESPACE = "namespace.inject.backdial.dev"
WEBHOOK_POD = "pod.inject.backdial.dev"
WEBHOOK_PATH = "/mutate-pods"
WEBHOOK_SERVICE = "backdial-webhook"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
TIMEOUT_SECONDS = 5
_NS_NAME = "kubernetes.io/metadata.name"  # set on every namespace by the API server


def _rules() -> list[dict[str, Any]]:
    return [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]


def webhook_configuration(
    operator_namespace: str,
    ca_bundle: bytes = b"",
    *,
    service: str = WEBHOOK_SERVICE,
    port: int = 443,
) -> dict[str, Any]:
    """The configuration object (the chart renders the same; ``caBundle`` patched at run time)."""
    excluded = [*SYSTEM_NAMESPACES, operator_namespace]
    client: dict[str, Any] = {
        "service": {
            "namespace": operator_namespace,
            "name": service,
            "path": WEBHOOK_PATH,
            "port": port,
        }
    }
    if ca_bundle:
        client["caBundle"] = base64.b64encode(ca_bundle).decode()
    common: dict[str, Any] = {
        "admissionReviewVersions": ["v1"],
        "clientConfig": client,
        "rules": _rules(),
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "sideEffects": "None",
        "timeoutSeconds": TIMEOUT_SECONDS,
        "reinvocationPolicy": "Never",
    }
    not_system = {"key": _NS_NAME, "operator": "NotIn", "values": excluded}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME, "labels": {"app.kubernetes.io/name": "backdial"}},
        "webhooks": [
            {
                "name": WEBHOOK_NAMESPACE,
                **common,
                "namespaceSelector": {
                    "matchLabels": {INJECT_LABEL: NAMESPACE_ENABLED},
                    "matchExpressions": [not_system],
                },
                "objectSelector": {
                    "matchExpressions": [
                        {"key": INJECT_LABEL, "operator": "NotIn", "values": ["false"]}
                    ]
                },
            },
            {
                "name": WEBHOOK_POD,
                **common,
                "namespaceSelector": {
                    "matchExpressions": [
                        not_system,
                        {"key": INJECT_LABEL, "operator": "NotIn", "values": [NAMESPACE_ENABLED]},
                    ]
                },
                "objectSelector": {"matchLabels": {INJECT_LABEL: "true"}},
            },
        ],
    }


METRICS_SERVICE = "backdial-metrics-api"


def api_services(
    operator_namespace: str, ca_bundle: bytes = b"", *, service: str = METRICS_SERVICE
) -> list[dict[str, Any]]:
    out = []
    for version, priority in (("v1beta2", 200), ("v1beta1", 100)):
        spec: dict[str, Any] = {
            "group": "custom.metrics.k8s.io",
            "version": version,
            "groupPriorityMinimum": 100,
            "versionPriority": priority,
            "service": {"namespace": operator_namespace, "name": service, "port": 443},
        }
        if ca_bundle:
            spec["caBundle"] = base64.b64encode(ca_bundle).decode()
        out.append(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {
                    "name": f"{version}.custom.metrics.k8s.io",
                    "labels": {"app.kubernetes.io/name": "backdial"},
                },
                "spec": spec,
            }
        )
    return out


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (for tests and the docs' truth table)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def webhooks_called(
    config: dict[str, Any], namespace_labels: dict[str, str], pod_labels: dict[str, str]
) -> list[str]:
    """Names of the webhooks the API server would call for a pod CREATE."""
    return [
        w["name"]
        for w in config["webhooks"]
        if selector_matches(w["namespaceSelector"], namespace_labels)
        and selector_matches(w["objectSelector"], pod_labels)
    ]
