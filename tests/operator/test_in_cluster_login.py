"""In a pod, the operator (its own client and kopf) dials the API server the kubelet names in
KUBERNETES_SERVICE_HOST/PORT, not kubernetes.default.svc:443 (which needs kube-proxy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backdial.operator import kube


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
