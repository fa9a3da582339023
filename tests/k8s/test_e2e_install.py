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

import datetime
import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

import harness
import pytest
import yaml

from tests.helpers import ROOT, get_json

pytestmark = pytest.mark.k8s

MANIFESTS = ROOT / "manifests"
SYSTEM_NS = "backdial-system"
ROLE_LABEL = "backdial.dev/operator-role"
PEERING = "/apis/kopf.dev/v1/clusterkopfpeerings/backdial"


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


def _operator_ready(cluster: harness.Cluster, count: int = 1) -> Any:
    """The operator pods that are Ready, once there are *count* of them."""
    pods = cluster.get_json(f"/api/v1/namespaces/{SYSTEM_NS}/pods")["items"]
    ready = [
        p
        for p in pods
        if p["spec"].get("nodeName") == harness.PROCESS_NODE_NAME
        and not p["metadata"].get("deletionTimestamp")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    ]
    return ready if len(ready) >= count else None


def _endpoints(cluster: harness.Cluster, service: str) -> list[str]:
    """Ready addresses of *service*'s EndpointSlices (where the API server sends calls)."""
    query = urllib.parse.quote(f"kubernetes.io/service-name={service}")
    slices = cluster.get_json(
        f"/apis/discovery.k8s.io/v1/namespaces/{SYSTEM_NS}/endpointslices?labelSelector={query}"
    )["items"]
    return sorted(
        a
        for s in slices
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready")
        for a in e["addresses"]
    )


def _state(pod: dict[str, Any]) -> Any:
    """The operator replica's /v1/state (its pod IP is on loopback: the process node)."""
    return get_json(f"http://{pod['status']['podIP']}:8080/v1/state")


def _one_acting(cluster: harness.Cluster) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(acting, standby) once both replicas are ready and exactly one acts. (Started at the
    same moment, both may act for a second before one sees the other and restarts as a
    standby: docs/operator.md, "High availability".)"""
    pods = _operator_ready(cluster, 2)
    if not pods or len(pods) != 2:
        return None
    try:
        acting = [p for p in pods if _state(p)["acting"]]
    except OSError:  # restarting
        return None
    if len(acting) != 1:
        return None
    (standby,) = [p for p in pods if p is not acting[0]]
    return acting[0], standby


def _peer_entry(cluster: harness.Cluster, pod_name: str) -> tuple[str, dict[str, Any]]:
    """The peering keepalive (identity, entry) of the operator replica in *pod_name*."""
    status = cluster.get_json(PEERING).get("status") or {}
    (identity,) = [i for i in status if i.startswith(pod_name + "/")]
    return identity, status[identity]


def _keep_peer_alive(cluster: harness.Cluster, identity: str, entry: dict[str, Any]) -> None:
    """Write the killed replica's keepalive back, fresh, as if it had died right after
    writing it: the standby then waits a whole peering lifetime (60 s) before it acts (a
    kill at a random moment leaves 5 to 60 s, kopf renews 5 to 10 s before the end). The
    entry is read before the kill: a force-deleted pod gets SIGTERM just before SIGKILL, and
    kopf sometimes removes its own keepalive in that moment, so it is written back whole."""
    fresh = datetime.datetime.now(datetime.UTC).isoformat()
    resp = cluster.api.request(
        "PATCH",
        PEERING,
        {"status": {identity: {**entry, "lastseen": fresh}}},
        content_type="application/merge-patch+json",
    )
    assert resp.status == 200, resp.text


def _standby_state(pod: dict[str, Any]) -> Any:
    """The standby's /v1/state once it answers and does not act (a replica that saw the dead
    peer's keepalive gone for a moment may have acted and restarts as a standby)."""
    try:
        state = _state(pod)
    except OSError:
        return None
    return None if state["acting"] else state


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

        # Both replicas are Ready, the standby too: the webhook's Service routes to both,
        # config streams (and the metrics API) only to the acting one, by its pod label.
        active, standby = harness.poll(
            lambda: _one_acting(cluster), timeout=180, what="2 ready replicas, one acting"
        )
        ips = sorted(p["status"]["podIP"] for p in (active, standby))
        harness.poll(
            lambda: (
                _endpoints(cluster, "backdial-operator") == [active["status"]["podIP"]]
                and _endpoints(cluster, "backdial-webhook") == ips
            ),
            timeout=60,
            what="config endpoints = the acting replica, webhook endpoints = both",
        )
        fresh = cluster.get_json(
            f"/api/v1/namespaces/{SYSTEM_NS}/pods/{active['metadata']['name']}"
        )
        assert fresh["metadata"]["labels"].get(ROLE_LABEL) == "active"

        # A standby-only period: the acting replica dies without a word (SIGKILL), so its
        # keepalive makes the standby wait. Opted-in pods are still injected meanwhile.
        identity, entry = _peer_entry(cluster, active["metadata"]["name"])
        cluster.kubectl(
            "delete", "pod", "-n", SYSTEM_NS, active["metadata"]["name"],
            "--grace-period=0", "--force",
        )  # fmt: skip
        _keep_peer_alive(cluster, identity, entry)
        harness.poll(lambda: _standby_state(standby), timeout=30, what="the standby waiting")
        names = harness.poll(injected, timeout=30, what="the standby to inject a pod")
        assert names[:2] == ["backdial-acceptor", "backdial-sidecar"]
        assert not _state(standby)["acting"]  # still no replica acting: the standby did it
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
