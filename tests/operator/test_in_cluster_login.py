"""In a pod, the operator (its own client and kopf) dials the API server the kubelet names in
KUBERNETES_SERVICE_HOST/PORT, not kubernetes.default.svc:443 (which needs kube-proxy)."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path

import pytest

from backdial.operator import certs, kube


def test_in_cluster_info_uses_the_kubelet_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("backdial-system")
    monkeypatch.setattr(kube, "SA_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "35123")
    info = kube.in_cluster_info()
    assert info is not None
    assert info.server == "https://127.0.0.1:35123"
    assert info.token == "tok"
    assert info.ca_path == str(tmp_path / "ca.crt")
    assert info.default_namespace == "backdial-system"

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert kube.in_cluster_info() is None  # not in a pod: kubeconfig instead


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_the_tls_secret_is_owned_by_the_operators_service_account() -> None:
    token = _jwt(
        {
            "kubernetes.io": {
                "namespace": "backdial-system",
                "serviceaccount": {"name": "backdial-operator", "uid": "u-1"},
                "pod": {"name": "p", "uid": "u-2"},
            }
        }
    )
    owner = kube.service_account_owner(token)
    assert owner == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "name": "backdial-operator",
        "uid": "u-1",
    }
    material = certs.renew(None, ["x.svc"], datetime.datetime.now(datetime.UTC))
    assert material is not None
    body = certs.secret_body("backdial-system", material, owner)
    assert body["metadata"]["ownerReferences"] == [owner]  # type: ignore[index]
    assert "ownerReferences" not in certs.secret_body("ns", material)["metadata"]  # type: ignore[operator]
    # A kubeconfig's token (no claims, or not a JWT at all) names no owner.
    assert kube.service_account_owner(_jwt({"sub": "admin"})) is None
    assert kube.service_account_owner("opaque-token") is None
    assert kube.service_account_owner(None) is None
