"""Installing backdial on the test cluster, as users do: ``kubectl apply -f manifests/``, and
the helm-install e2e module (``e2e/test_install.py``) run as CI's instance of it.

Both install cluster-wide singletons (CRDs, the webhook configuration, the metrics
APIServices, kopf's peering object) and a two-replica operator that must be the only operator
of its cluster, so they get a control plane of their own, started once for this module, with
its process node on 127.44.0.0/16 (the session cluster's stays on 127.42.0.0/16, so pods of
both never share an address). The operator, the demo and the load are placed on the process
node (SHAPES §1): every pod of the scenario really runs, and all traffic stays on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import harness
import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.k8s

MANIFESTS = ROOT / "manifests"
SYSTEM_NS = "backdial-system"


@pytest.fixture(scope="module")
def own_cluster(request: pytest.FixtureRequest) -> Iterator[harness.Cluster]:
    cluster = harness.Cluster(harness.build(), process_pod_cidr="127.44.0.0/16")
    cluster.start()
    try:
        yield cluster
    finally:
        kept = cluster.stop(keep_logs=request.session.testsfailed > 0)
        if kept is not None:
            sys.stderr.write(f"\ne2e control-plane logs kept in {kept}\n")


def _placed(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for obj in objs:
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            template["spec"] = harness.place_on_process_node(template["spec"])
    return objs


def _operator_ready(cluster: harness.Cluster) -> Any:
    pods = cluster.get_json(f"/api/v1/namespaces/{SYSTEM_NS}/pods")["items"]
    ready = [
        p
        for p in pods
        if p["spec"].get("nodeName") == harness.PROCESS_NODE_NAME
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    ]
    return ready or None


@pytest.mark.timeout(600)
def test_kubectl_apply_manifests_installs_a_working_operator(
    own_cluster: harness.Cluster,
) -> None:
    cluster = own_cluster
    cluster.kubectl("apply", "-f", str(MANIFESTS / "crds.yaml"))
    # The one change the test cluster needs: the operator pods go to the process node.
    objs = [o for o in yaml.safe_load_all((MANIFESTS / "backdial.yaml").read_text()) if o]
    cluster.apply(_placed(objs))
    try:
        harness.poll(lambda: _operator_ready(cluster), timeout=180, what="an operator pod Ready")
        # Working: the API server reaches the webhook through its Service, with the CA the
        # operator patched in, and the pod comes back injected (server-side dry run).
        cluster.kubectl("create", "namespace", "manifests-check")
        cluster.kubectl("label", "namespace", "manifests-check", "backdial.dev/inject=enabled")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "probe", "namespace": "manifests-check"},
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": harness.DEFAULT_PROJECT_IMAGE + ":0.1.0",
                        "ports": [{"name": "http", "containerPort": 8080}],
                    }
                ]
            },
        }

        def injected() -> Any:
            done = cluster.kubectl(
                "create", "--dry-run=server", "-o", "json", "-f", "-",
                input=json.dumps(pod), check=False,
            )  # fmt: skip
            if done.returncode != 0:
                return None  # CA bundle not patched in yet, or the endpoint not ready
            names = [c["name"] for c in json.loads(done.stdout)["spec"].get("initContainers", [])]
            return names or None

        names = harness.poll(injected, timeout=90, what="the webhook to inject a pod")
        assert names[:2] == ["backdial-acceptor", "backdial-sidecar"]
    finally:
        # Uninstall completely (CRDs too), so the helm scenario starts from an empty cluster.
        cluster.kubectl("delete", "namespace", "manifests-check", "--wait=false", check=False)
        for name in ("backdial.yaml", "crds.yaml"):
            cluster.kubectl(
                "delete", "-f", str(MANIFESTS / name), "--ignore-not-found", "--wait",
                "--timeout=150s", timeout=180, check=False,
            )  # fmt: skip


@pytest.mark.timeout(900)
def test_helm_install_scenario(own_cluster: harness.Cluster) -> None:
    env = dict(
        own_cluster.env(),
        BACKDIAL_E2E_PLACEMENT=json.dumps(harness.PROCESS_PLACEMENT),
        KUBECTL=str(own_cluster.kubectl_path),
        HELM=str(own_cluster.helm_path),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "e2e/test_install.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    summary = done.stdout[-8000:] + done.stderr[-2000:]
    assert done.returncode == 0, summary
    assert " 4 passed" in done.stdout, summary
