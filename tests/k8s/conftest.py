"""Fixtures for tests against a real local Kubernetes control plane.

When any selected test is marked ``k8s``, the binaries that are missing from the cache are
built at the end of collection (``e2e/cluster/build.sh``: from the Go module proxy into
``~/.cache/backdial``; minutes when cold, about a second when warm), so that no per-test
timeout covers the build.

``k8s_cluster`` (session scope) then starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok on 127.0.0.1 (``e2e/cluster/harness.py``) and yields the
:class:`harness.Cluster`: ``.kubeconfig``, ``.kubectl_path``, ``.helm_path``, ``.kubectl(...)``,
``.helm(...)``, ``.apply(...)``, ``.api.request(...)`` (HTTPS as admin, optionally
impersonating someone) and ``.get_json(...)``. Everything is stopped at the end of the session;
when a test failed the component logs are kept and their directory is printed.

Environment knobs:

* ``BACKDIAL_SKIP_K8S=1``: skip these tests.
* ``BACKDIAL_K8S_REQUIRE=1`` (meant for CI): fail instead of skipping when Go/openssl is missing.
* ``BACKDIAL_K8S_BUILD_TIMEOUT`` (seconds, default 3600), ``BACKDIAL_K8S_START_TIMEOUT``
  (default 180) and ``BACKDIAL_K8S_TEST_TIMEOUT`` (pytest-timeout per k8s test, default 300).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "e2e" / "cluster"
if str(CLUSTER_DIR) not in sys.path:
    sys.path.insert(0, str(CLUSTER_DIR))

import harness  # noqa: E402

# Outcome of the build done during collection: the binaries, or why there are none.
_BUILD_KEY = pytest.StashKey[harness.Binaries | BaseException]()


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``k8s`` marker (harmless when pyproject.toml registers it too)."""
    config.addinivalue_line(
        "markers", "k8s: needs the local Kubernetes control plane from e2e/cluster"
    )


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Build missing binaries once if k8s tests were selected; widen their timeout."""
    k8s_items = [item for item in items if item.get_closest_marker("k8s") is not None]
    if not k8s_items:
        return
    if config.pluginmanager.hasplugin("timeout"):
        test_timeout = _env_float("BACKDIAL_K8S_TEST_TIMEOUT", 300.0)
        for item in k8s_items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(test_timeout))
    if os.environ.get("BACKDIAL_SKIP_K8S") == "1" or harness.missing_prerequisites():
        return  # the fixture reports why
    try:
        binaries: harness.Binaries | BaseException = harness.build(
            timeout=_env_float("BACKDIAL_K8S_BUILD_TIMEOUT", 3600.0)
        )
    except harness.HarnessError as exc:
        binaries = exc
    config.stash[_BUILD_KEY] = binaries


def _unavailable(reason: str) -> None:
    if os.environ.get("BACKDIAL_K8S_REQUIRE") == "1":
        pytest.fail(f"k8s tests required (BACKDIAL_K8S_REQUIRE=1) but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[harness.Cluster]:
    """A running local control plane shared by the whole test session."""
    if os.environ.get("BACKDIAL_SKIP_K8S") == "1":
        pytest.skip("BACKDIAL_SKIP_K8S=1")
    missing = harness.missing_prerequisites()
    if missing:
        _unavailable("missing " + "; ".join(missing))
    built = request.config.stash.get(_BUILD_KEY, None)
    if built is None:  # e.g. collected through another path: build now
        built = harness.build(timeout=_env_float("BACKDIAL_K8S_BUILD_TIMEOUT", 3600.0))
    if isinstance(built, harness.ToolchainMissingError):
        _unavailable(str(built))
    if isinstance(built, BaseException):
        raise built
    cluster = harness.Cluster(built)
    cluster.start(timeout=_env_float("BACKDIAL_K8S_START_TIMEOUT", 180.0))
    try:
        yield cluster
    finally:
        failed = request.session.testsfailed > 0
        kept = cluster.stop(keep_logs=failed)
        if kept is not None:
            sys.stderr.write(f"\nk8s control-plane logs kept in {kept}\n")


@pytest.fixture
def k8s_namespace(k8s_cluster: harness.Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    response = k8s_cluster.api.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    assert response.status == 201, response.text
    yield name
    k8s_cluster.api.request("DELETE", f"/api/v1/namespaces/{name}")
