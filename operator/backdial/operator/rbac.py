"""The operator's least-privilege RBAC: exactly the verbs its code uses, and why.

``CLUSTER_RULES`` go into the ClusterRole ``backdial-operator``; ``NAMESPACE_RULES`` (and
``SECRET_RULES`` with the self-managed CA) into a Role in the operator's own namespace
(the TLS Secret is the only Secret it touches, so it cannot read Secrets anywhere else,
and the only pods it writes are its own, to label the acting one).  The chart takes the
generated copies in ``charts/backdial/files/`` (``backdial crd --rbac-dir``); a test
impersonates the operator's ServiceAccount with these rules and checks that what it needs
is allowed and that a Secret elsewhere is forbidden, and the end-to-end tests run the
operator with them.
"""

from __future__ import annotations

from typing import Any

import yaml

from backdial.operator import models
from backdial.operator.aggregatorauth import CONFIGMAP_NAMESPACE
from backdial.operator.certs import SECRET_NAME
from backdial.operator.metricsapi import GROUP, Version
from backdial.operator.webhookconfig import CONFIG_NAME

SERVICE_ACCOUNT = "backdial-operator"


def _rule(
    groups: list[str], resources: list[str], verbs: list[str], **extra: Any
) -> dict[str, Any]:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs, **extra}


CLUSTER_RULES: list[dict[str, Any]] = [
    # kopf: the SessionSlice index and events (watch with an initial list).
    _rule([models.GROUP], [models.PLURAL], ["get", "list", "watch"]),
    # The operator writes only the status subresource (one merge patch per change).
    _rule([models.GROUP], [f"{models.PLURAL}/status"], ["patch"]),
    # kopf: the pod index (label-selected watch); pods are never written.
    _rule([""], ["pods"], ["get", "list", "watch"]),
    # Conflict and invalid-spec Events on SessionSlices.
    _rule([""], ["events"], ["create"]),
    # Who is dialing: TokenReview of the acceptors' pod-bound tokens.
    _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
    # kopf peering between replicas; the operator creates the object if it is missing.
    _rule(["kopf.dev"], ["clusterkopfpeerings"], ["get", "list", "watch", "patch", "create"]),
    # The HPA a SessionSlice's spec.autoscaling asks for (scaling.apply_hpa), and kopf's
    # HPA index: an HPA deleted by hand comes back, others' HPAs on the target are seen.
    _rule(
        ["autoscaling"],
        ["horizontalpodautoscalers"],
        ["get", "list", "watch", "create", "update", "delete"],
    ),
    # The metrics API asks whether the aggregator's caller may read a metric.
    _rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
]

# Only with the self-managed CA (cert-manager's CA injector does it otherwise): the
# operator's CA into the webhook configuration and the APIServices (cabundle.py).
CA_BUNDLE_RULES: list[dict[str, Any]] = [
    _rule(
        ["admissionregistration.k8s.io"],
        ["mutatingwebhookconfigurations"],
        ["get", "patch"],
        resourceNames=[CONFIG_NAME],
    ),
    _rule(
        ["apiregistration.k8s.io"],
        ["apiservices"],
        ["get", "patch"],
        resourceNames=[f"{v.value}.{GROUP}" for v in Version],
    ),
]

NAMESPACE_RULES: list[dict[str, Any]] = [
    # The acting replica labels its own pod (role.py): the Services of the config streams
    # and the metrics API select that label (a merge patch: no read needed).
    _rule([""], ["pods"], ["patch"]),
]

# Only with the self-managed CA (with cert-manager the TLS files are mounted).
SECRET_RULES: list[dict[str, Any]] = [
    # The self-managed TLS Secret: read and rotate it ...
    _rule([""], ["secrets"], ["get", "update"], resourceNames=[SECRET_NAME]),
    # ... and create it the first time (create cannot be limited by name).
    _rule([""], ["secrets"], ["create"]),
]


def objects(namespace: str) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole(Binding) and Role(Binding), as the chart renders them."""
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]
    labels = {"app.kubernetes.io/name": "backdial"}
    meta = {"name": SERVICE_ACCOUNT, "labels": labels}
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "name": SERVICE_ACCOUNT}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {**meta, "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta,
            "rules": CLUSTER_RULES + CA_BUNDLE_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta,
            "roleRef": {**role_ref, "kind": "ClusterRole"},
            "subjects": subject,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {**meta, "namespace": namespace},
            "rules": NAMESPACE_RULES + SECRET_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {**meta, "namespace": namespace},
            "roleRef": {**role_ref, "kind": "Role"},
            "subjects": subject,
        },
        # The metrics API reads the requestheader CA (kube-system's built-in Role).
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": f"{SERVICE_ACCOUNT}:extension-apiserver-authentication-reader",
                "namespace": CONFIGMAP_NAMESPACE,
                "labels": labels,
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "extension-apiserver-authentication-reader",
            },
            "subjects": subject,
        },
    ]


def chart_files() -> dict[str, str]:
    """``charts/backdial/files/``: the rule lists, for ``{{ .Files.Get }}`` under ``rules:``."""
    head = "# Generated by `backdial crd --rbac-dir` from backdial.operator.rbac; do not edit.\n"
    return {
        "operator-clusterrole-rules.yaml": head + yaml.safe_dump(CLUSTER_RULES, sort_keys=False),
        "operator-role-rules.yaml": head + yaml.safe_dump(NAMESPACE_RULES, sort_keys=False),
        "operator-secret-rules.yaml": head + yaml.safe_dump(SECRET_RULES, sort_keys=False),
        "operator-cabundle-rules.yaml": head + yaml.safe_dump(CA_BUNDLE_RULES, sort_keys=False),
    }
