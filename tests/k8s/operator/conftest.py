"""Fixtures for the operator's tests on the real control plane: CRDs installed once."""

from __future__ import annotations

from collections.abc import Iterator

import harness
import pytest

from backdial.operator import crd


@pytest.fixture(scope="session")
def crds(k8s_cluster: harness.Cluster) -> Iterator[harness.Cluster]:
    """The cluster with the generated CRDs installed and established."""
    k8s_cluster.apply(crd.render(crd.all_crds()))
    for name in (c["metadata"]["name"] for c in crd.all_crds()):
        k8s_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
    yield k8s_cluster
