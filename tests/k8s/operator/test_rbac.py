"""The operator's ServiceAccount can do what the operator does, and nothing more.

The requests impersonate ``system:serviceaccount:backdial-system:backdial-operator`` with
the RBAC from ``backdial.operator.rbac`` (the other operator tests run the operator itself
with exactly these permissions).
"""

from __future__ import annotations

import pytest

from backdial.operator import certs, rbac
from tests.k8s.operator.opstack import OPERATOR_NS, OperatorEnv, sessionslice

pytestmark = pytest.mark.k8s
SA = f"system:serviceaccount:{OPERATOR_NS}:{rbac.SERVICE_ACCOUNT}"


def test_operator_rbac_is_least_privilege(ops: OperatorEnv, k8s_namespace: str) -> None:
    ns = k8s_namespace
    api = ops.cluster.api
    spec = {"selector": {"matchLabels": {"app": "x"}}, "capacity": {"sessionsPerPod": 1}}
    ops.cluster.apply(sessionslice("rbac", ns, spec))
    slice_path = f"/apis/backdial.dev/v1alpha1/namespaces/{ns}/sessionslices/rbac"

    def call(method: str, path: str, body: object = None, ctype: str = "application/json") -> int:
        return api.request(method, path, body, impersonate_user=SA, content_type=ctype).status

    allowed = {
        "list pods everywhere": call("GET", "/api/v1/pods?limit=1"),
        "watch pods": call("GET", "/api/v1/pods?watch=1&timeoutSeconds=1"),
        "list sessionslices": call("GET", "/apis/backdial.dev/v1alpha1/sessionslices"),
        "patch status": call(
            "PATCH",
            slice_path + "/status",
            {"status": {"selectedPods": 0}},
            "application/merge-patch+json",
        ),
        "create events": call(
            "POST",
            f"/api/v1/namespaces/{ns}/events",
            {
                "metadata": {"generateName": "rbac."},
                "involvedObject": {"kind": "SessionSlice", "name": "rbac", "namespace": ns},
                "reason": "Test",
                "message": "rbac test",
                "type": "Normal",
            },
        ),
        "token reviews": call(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {"spec": {"token": "x", "audiences": ["backdial"]}},
        ),
        "its TLS Secret": call(
            "GET", f"/api/v1/namespaces/{OPERATOR_NS}/secrets/{certs.SECRET_NAME}"
        ),
        "peering": call("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/backdial"),
        "peering patch": call(
            "PATCH",
            "/apis/kopf.dev/v1/clusterkopfpeerings/backdial",
            {"status": {}},
            "application/merge-patch+json",
        ),
    }
    assert {k: v for k, v in allowed.items() if v not in (200, 201)} == {}
    # The acting replica labels its own pod: patching pods at home passes authorization
    # (404: no such pod here), anywhere else it does not.
    label = {"metadata": {"labels": {"backdial.dev/operator-role": "active"}}}
    merge = "application/merge-patch+json"
    home = f"/api/v1/namespaces/{OPERATOR_NS}/pods/no-such-pod"
    assert call("PATCH", home, label, merge) == 404

    forbidden = {
        "a Secret elsewhere": call("GET", f"/api/v1/namespaces/{ns}/secrets"),
        "another Secret at home": call(
            "GET", f"/api/v1/namespaces/{OPERATOR_NS}/secrets/something-else"
        ),
        "list Secrets at home": call("GET", f"/api/v1/namespaces/{OPERATOR_NS}/secrets"),
        "label pods elsewhere": call(
            "PATCH", f"/api/v1/namespaces/{ns}/pods/no-such-pod", label, merge
        ),
        "write pods": call(
            "POST",
            f"/api/v1/namespaces/{ns}/pods",
            {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
        ),
        "change a spec": call(
            "PATCH",
            slice_path,
            {"spec": {"capacity": {"sessionsPerPod": 9}}},
            "application/merge-patch+json",
        ),
        "delete a SessionSlice": call("DELETE", slice_path),
        "read ConfigMaps": call("GET", f"/api/v1/namespaces/{ns}/configmaps"),
        "read CRDs": call("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"),
    }
    assert set(forbidden.values()) == {403}, forbidden
