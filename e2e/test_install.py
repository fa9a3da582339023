"""End to end, the way a user meets backdial: ``helm install``, an opted-in namespace, the demo
with an autoscaled SessionSlice, load, the HPA scaling on queue depth, ``helm uninstall``.

The cluster is whatever ``KUBECONFIG`` points at:

* the test cluster of ``e2e/cluster`` (``tests/k8s/test_e2e_install.py`` runs this module with
  the process-node placement, in CI);
* a kind cluster (``e2e/kind/run``).

Environment:

* ``KUBECONFIG`` (required; without it the module is skipped);
* ``BACKDIAL_E2E_IMAGE``: the image for the operator, the injected containers, the demo and
  the load (default ``ghcr.io/backdial/backdial:<appVersion>``);
* ``BACKDIAL_E2E_PLACEMENT``: JSON ``{"nodeSelector": ..., "tolerations": ...}`` added to
  every pod that must really run (chart values and workload pod specs);
* ``KUBECTL``, ``HELM``: the binaries (default: from ``PATH``).

The tests run in file order and share one installation (module fixtures): each step needs the
previous one. Traffic from this process goes only to loopback: a pod IP in 127.0.0.0/8 is
dialled directly, any other pod through ``kubectl port-forward``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "backdial"
EXAMPLES = ROOT / "docs" / "examples"
RELEASE = "backdial"
SYSTEM_NS = "backdial-system"
DEFAULT_REPOSITORY = "ghcr.io/backdial/backdial"
OPERATOR_PODS = "app.kubernetes.io/component=operator"

T = TypeVar("T")

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="KUBECONFIG is not set"),
]


def _app_version() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return str(chart["appVersion"])


IMAGE = os.environ.get("BACKDIAL_E2E_IMAGE") or f"{DEFAULT_REPOSITORY}:{_app_version()}"
PLACEMENT: dict[str, Any] = json.loads(os.environ.get("BACKDIAL_E2E_PLACEMENT") or "{}")


# -- clients -----------------------------------------------------------------------------------


def run(tool: str, *args: str, input: str | None = None, check: bool = True) -> str:
    binary = os.environ.get(tool.upper(), tool)
    done = subprocess.run(
        [binary, *args], input=input, capture_output=True, text=True, timeout=300, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} -> {done.returncode}:\n{done.stderr}")
    return done.stdout


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    return run("kubectl", *args, input=input, check=check)


def get(kind: str, name: str = "", namespace: str = "") -> Any:
    """The object (or list) as JSON; None when it does not exist."""
    ns = ["-n", namespace] if namespace else []
    out = kubectl("get", kind, *([name] if name else []), *ns, "-o", "json", check=False)
    return json.loads(out) if out.strip() else None


def wait(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def placed(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """*pod_spec* with the cluster's placement for pods that must run."""
    if PLACEMENT.get("nodeSelector"):
        pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **PLACEMENT["nodeSelector"]}
    if PLACEMENT.get("tolerations"):
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *PLACEMENT["tolerations"]]
    return pod_spec


def example(name: str, namespace: str) -> list[dict[str, Any]]:
    """A docs/examples manifest for *namespace*, with this run's image and placement."""
    objs = [o for o in yaml.safe_load_all((EXAMPLES / name).read_text()) if o]
    for obj in objs:
        obj["metadata"]["namespace"] = namespace
        if obj["kind"] == "Deployment":
            spec = placed(obj["spec"]["template"]["spec"])
            for container in spec["containers"]:
                container["image"] = IMAGE
    return objs


def apply(objs: list[dict[str, Any]]) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


def deployment_ready(name: str, namespace: str, replicas: int) -> bool:
    dep = get("deployment", name, namespace) or {}
    status = dep.get("status", {})
    return (
        dep.get("spec", {}).get("replicas") == replicas
        and status.get("readyReplicas") == replicas
        and status.get("updatedReplicas") == replicas
    )


@contextlib.contextmanager
def reach(pod: dict[str, Any], port: int) -> Iterator[str]:
    """A base URL on loopback that reaches *port* of *pod*."""
    ip = pod["status"]["podIP"]
    if ipaddress.ip_address(ip).is_loopback:  # the test cluster's process node
        yield f"http://{ip}:{port}"
        return
    proc = subprocess.Popen(
        [os.environ.get("KUBECTL", "kubectl"), "port-forward", "-n",
         pod["metadata"]["namespace"], f"pod/{pod['metadata']['name']}", f"127.0.0.1::{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward: {line}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        proc.wait(10)


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read()


# -- the scenario ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``helm install`` of the chart (images and placement of this cluster); uninstalled at
    the end unless the uninstall test did it."""
    repository, _, tag = IMAGE.rpartition(":")
    values = {"image": {"repository": repository, "tag": tag}, "operator": dict(PLACEMENT)}
    values_file = tmp_path_factory.mktemp("values") / "values.json"
    values_file.write_text(json.dumps(values))
    run(
        "helm", "install", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--create-namespace",
        "--values", str(values_file),
    )  # fmt: skip
    try:
        # Every replica reports ready, the standby too (it serves the webhook), so this is
        # what `helm install --wait` and `kubectl rollout status` wait for.
        wait(lambda: deployment_ready("backdial-operator", SYSTEM_NS, 2), 180, "the operator")
        kubectl("rollout", "status", "-n", SYSTEM_NS, "deployment/backdial-operator")
        yield RELEASE
    finally:
        run("helm", "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", check=False)


@pytest.fixture(scope="module")
def demo(release: str) -> Iterator[str]:
    """An opted-in namespace with the demo (Deployment, Service, autoscaled SessionSlice)."""
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", namespace)
    kubectl("label", "namespace", namespace, "backdial.dev/inject=enabled")
    try:
        apply(example("demo.yaml", namespace))
        yield namespace
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    """Pods (not terminating) with every label of *selector* (``k=v,k2=v2``)."""
    pods = get("pods", namespace=namespace) or {"items": []}
    wanted = dict(term.partition("=")[::2] for term in selector.split(","))
    return [
        p
        for p in pods["items"]
        if wanted.items() <= p["metadata"].get("labels", {}).items()
        and not p["metadata"].get("deletionTimestamp")
    ]


def _ready(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in pods
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    ]


def test_operator_runs_where_the_values_place_it(release: str) -> None:
    def running() -> list[dict[str, Any]] | None:
        pods = _pods(SYSTEM_NS, OPERATOR_PODS)
        ok = len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
        return pods if ok else None

    pods = wait(running, 120, "two operator pods running")
    assert len(_ready(pods)) == 2  # both serve the webhook
    # The one that acts carries the label the config and metrics Services select.
    wait(
        lambda: len(_pods(SYSTEM_NS, OPERATOR_PODS + ",backdial.dev/operator-role=active")) == 1,
        60,
        "one operator pod labelled as acting",
    )
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["image"] == IMAGE
        node = get("node", pod["spec"]["nodeName"])
        for key, value in (PLACEMENT.get("nodeSelector") or {}).items():
            assert node["metadata"]["labels"].get(key) == value, (pod["metadata"]["name"], key)
    # The caBundles were filled in (by the operator's own CA here).
    wait(
        lambda: all(
            w["clientConfig"].get("caBundle")
            for w in get("mutatingwebhookconfiguration", "backdial-injector")["webhooks"]
        ),
        60,
        "the operator to put its CA into the webhook configuration",
    )
    api = wait(
        lambda: (
            (s := get("apiservice", "v1beta2.custom.metrics.k8s.io"))
            and any(
                c["type"] == "Available" and c["status"] == "True"
                for c in s["status"].get("conditions", [])
            )
            and s
        ),
        timeout=60,
        what="the custom metrics APIService to become Available",
    )
    assert api["spec"]["service"]["namespace"] == SYSTEM_NS


def test_injected_demo_serves_through_the_sidecar(demo: str) -> None:
    wait(lambda: deployment_ready("web", demo, 2), 180, "the demo's 2 pods to become ready")
    pods = _pods(demo, "app=web")
    assert len(pods) == 2
    for pod in pods:
        assert pod["metadata"]["labels"]["backdial.dev/injected"] == "true"
        init = {c["name"]: c for c in pod["spec"]["initContainers"]}
        assert init["backdial-acceptor"]["restartPolicy"] == "Always"
        sidecar = init["backdial-sidecar"]
        assert sidecar["restartPolicy"] == "Always"
        assert [p["name"] for p in sidecar["ports"] if p["name"] == "http"] == ["http"]
        app = pod["spec"]["containers"][0]
        assert not [p for p in app.get("ports", []) if p.get("name") == "http"]
        with reach(pod, 8080) as base:
            status, body = http_get(f"{base}/whoami")
        assert status == 200
        # The demo answered over a session it registered at the acceptor.
        assert json.loads(body)["instance"]

    def configured() -> dict[str, Any] | None:
        ss = get("sessionslice", "web", demo) or {}
        status = ss.get("status", {})
        done = status.get("readyPods") == 2 and status.get("registeredSessions") == 4
        return status if done else None

    wait(configured, 60, "the SessionSlice to report 2 ready pods with 4 sessions")


def test_hpa_scales_on_queue_depth(demo: str) -> None:
    hpa = wait(lambda: get("hpa", "web", demo), 60, "the SessionSlice's HPA")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "backdial_requests_waiting"
    apply(example("load.yaml", demo))
    try:
        wait(
            lambda: (get("deployment", "web", demo) or {}).get("spec", {}).get("replicas", 0) > 2,
            120,
            "the HPA to scale the demo up on waiting requests",
        )
        raw = json.loads(
            kubectl(
                "get", "--raw",
                f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{demo}/pods/*/"
                "backdial_requests_waiting",
            )
        )  # fmt: skip
        assert raw["items"], raw
        hpa = get("hpa", "web", demo)
        current = hpa["status"].get("currentMetrics") or []
        assert current and current[0]["pods"]["metric"]["name"] == "backdial_requests_waiting"
        replicas = get("deployment", "web", demo)["spec"]["replicas"]
        wait(
            lambda: deployment_ready("web", demo, replicas),
            180,
            f"{replicas} demo pods to become ready",
        )
    finally:
        kubectl("delete", "deployment", "load", "-n", demo, "--wait=false", check=False)
    wait(
        lambda: (get("deployment", "web", demo) or {}).get("spec", {}).get("replicas") == 2,
        180,
        "the HPA to scale the demo back down once the queue is empty",
    )


def test_helm_uninstall_removes_everything_but_kept_crds(release: str, demo: str) -> None:
    run("helm", "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait")
    assert get("deployment", "backdial-operator", SYSTEM_NS) is None
    for kind, name, ns in (
        ("serviceaccount", "backdial-operator", SYSTEM_NS),
        ("service", "backdial-operator", SYSTEM_NS),
        ("service", "backdial-webhook", SYSTEM_NS),
        ("configmap", "backdial-inject", SYSTEM_NS),
        ("clusterrole", "backdial-operator", ""),
        ("clusterrolebinding", "backdial-operator", ""),
        ("mutatingwebhookconfiguration", "backdial-injector", ""),
        ("apiservice", "v1beta2.custom.metrics.k8s.io", ""),
        ("rolebinding", "backdial-operator:extension-apiserver-authentication-reader",
         "kube-system"),
    ):  # fmt: skip
        assert get(kind, name, ns) is None, f"{kind}/{name} survived helm uninstall"
    # The operator's TLS Secret is owned by its ServiceAccount: the garbage collector takes it.
    wait(
        lambda: get("secret", "backdial-operator-tls", SYSTEM_NS) is None,
        60,
        "the operator's TLS Secret to be collected",
    )
    assert get("crd", "sessionslices.backdial.dev") is not None
    assert get("crd", "clusterkopfpeerings.kopf.dev") is not None
    assert get("sessionslice", "web", demo) is not None  # kept with its CRD
