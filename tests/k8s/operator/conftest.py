"""Fixtures for the operator's tests on the real control plane: CRDs installed once, one
operator process (as its ServiceAccount) for the session, pods' processes per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import harness
import pytest

from backdial.operator import crd
from tests.k8s.operator.opstack import OperatorEnv, operator_env


@pytest.fixture(scope="session")
def crds(k8s_cluster: harness.Cluster) -> Iterator[harness.Cluster]:
    """The cluster with the generated CRDs installed and established."""
    k8s_cluster.apply(crd.render(crd.all_crds()))
    for name in (c["metadata"]["name"] for c in crd.all_crds()):
        k8s_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
    yield k8s_cluster


@pytest.fixture(scope="session")
def operator_session(crds: harness.Cluster) -> Iterator[OperatorEnv]:
    with operator_env(crds) as env:
        yield env


@pytest.fixture
def ops(operator_session: OperatorEnv, request: pytest.FixtureRequest) -> Iterator[OperatorEnv]:
    """The session's operator (restarted if a test stopped it); pods' processes stop after."""
    env = operator_session
    failed_before = request.session.testsfailed
    if not env.operator.alive():
        env.operator.start()
    yield env
    if request.session.testsfailed > failed_before:
        sys.stderr.write("\n----- operator log (tail) -----\n" + env.operator.output()[-5000:])
    env.stop_stacks()
