"""Issue 9 end to end: injection, drain and autoscaling on the real control plane, with
pods that really run on the process node and ``backdial operator`` as a local process.

Traffic goes only to pod IPs in 127.42.0.0/16. There is no kube-proxy, so the load
generator plays its part: it sends new requests only to the ready endpoints of the
Service's EndpointSlices, refreshed continuously, as a proxy or load balancer would.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import pytest

from backdial.operator.cabundle import WEBHOOK_CONFIG_PATH, patch_bundles
from tests.helpers import wait_for
from tests.k8s.operator import wiring
from tests.k8s.operator.opstack import OperatorEnv, condition, slice_status
from tests.stack.test_stack import Load

IMAGE = f"{harness.DEFAULT_PROJECT_IMAGE}:0.1.0"

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

QUIET = 2.0  # drain quiet period: endpoints update well within it here
OTHER_CA = b"-----BEGIN CERTIFICATE-----\nMIIBtwo\n-----END CERTIFICATE-----\n"
SLICE_CONFIG_QUEUE = {"maxWaiting": 200, "timeout": "20s"}


@pytest.fixture(scope="module")
def wired(operator_session: OperatorEnv) -> Iterator[OperatorEnv]:
    """The session's operator, reachable by the API server (webhook, metrics API) and pods."""
    wiring.install(operator_session)
    try:
        wiring.wait_wired(operator_session.cluster)
        yield operator_session
    finally:
        wiring.uninstall(operator_session.cluster)


@pytest.fixture
def operator(wired: OperatorEnv, ops: OperatorEnv) -> OperatorEnv:
    return ops


@pytest.fixture
def opted_in(crds: harness.Cluster, k8s_namespace: str) -> str:
    crds.kubectl("label", "namespace", k8s_namespace, "backdial.dev/inject=enabled")
    return k8s_namespace


def deployment(name: str, ns: str, replicas: int, sessions: int) -> dict[str, Any]:
    app = {
        "name": "app",
        "image": IMAGE,
        "args": ["serve", "backdial.demo:app", "--sessions", str(sessions), "--service", name],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 5},
    }
    return harness.process_deployment(
        name, ns, replicas, {"containers": [app], "terminationGracePeriodSeconds": 20}
    )


def service(name: str, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": "http"}]},
    }


def pods(cluster: harness.Cluster, ns: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        f"/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{app}"
    )["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conds
    )


def wait_ready(cluster: harness.Cluster, ns: str, app: str, n: int, timeout: float = 90) -> None:
    wait_for(
        lambda: (
            sum(ready(p) for p in pods(cluster, ns, app)) == n and len(pods(cluster, ns, app)) == n
        ),
        timeout=timeout,
        what=f"{n} ready pods of {app}",
    )


def get(ip: str, path: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(ip, 8080, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class EndpointLoad(Load):
    """Closed-loop load over the Service's ready endpoints (what kube-proxy would pick)."""

    def __init__(
        self, cluster: harness.Cluster, ns: str, svc: str, path: str, clients: int
    ) -> None:
        self.cluster, self.ns, self.svc = cluster, ns, svc
        self.ips: list[str] = []
        super().__init__(8080, path, clients, hosts=lambda: self.ips)
        self._threads.append(threading.Thread(target=self._refresh, daemon=True))

    def _endpoints(self) -> list[str]:
        query = urllib.parse.quote(f"kubernetes.io/service-name={self.svc}")
        slices = self.cluster.get_json(
            f"/apis/discovery.k8s.io/v1/namespaces/{self.ns}/endpointslices?labelSelector={query}"
        )
        return sorted(
            a
            for s in slices["items"]
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for a in e["addresses"]
        )

    def _refresh(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # keep the last list through a hiccup
                self.ips = self._endpoints()
            time.sleep(0.1)


# -- injection ----------------------------------------------------------------------------------
def test_deployment_is_injected_ready_and_serves_through_the_sidecar(
    operator: OperatorEnv, crds: harness.Cluster, opted_in: str, k8s_namespace: str
) -> None:
    ns = opted_in
    crds.apply([deployment("web", ns, 2, 2), service("web", ns)])
    wait_ready(crds, ns, "web", 2)
    pod = pods(crds, ns, "web")[0]
    spec = pod["spec"]
    inits = spec["initContainers"]
    assert [c["name"] for c in inits] == ["backdial-acceptor", "backdial-sidecar"]
    assert all(c["restartPolicy"] == "Always" for c in inits)
    assert inits[0]["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in inits[1]["ports"]
    app = spec["containers"][0]
    assert not any(p.get("name") == "http" for p in app.get("ports") or [])
    assert app["readinessProbe"]["httpGet"]["path"] == "/v1/app-probe?path=%2F"
    assert app["livenessProbe"]["httpGet"]["port"] == 9902
    assert pod["metadata"]["labels"]["backdial.dev/injected"] == "true"
    # Ready, and the traffic port answers through the sidecar and a leased session.
    ip = pod["status"]["podIP"]
    assert get(ip, "/")[1] == b"hello from backdial\n"
    status, body = get(ip, "/whoami")
    assert status == 200 and "via" in json.loads(body)["headers"]


def test_pods_outside_the_opt_in_are_untouched(
    operator: OperatorEnv, crds: harness.Cluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace  # not labelled
    crds.apply(deployment("plain", ns, 1, 1))
    wait_for(lambda: len(pods(crds, ns, "plain")) == 1, what="pod created")
    pod = pods(crds, ns, "plain")[0]
    assert "initContainers" not in pod["spec"]
    assert pod["spec"]["containers"][0]["ports"][0]["name"] == "http"
    assert "backdial.dev/injected" not in (pod["metadata"].get("labels") or {})


def test_opted_out_pod_and_double_injection(
    operator: OperatorEnv, crds: harness.Cluster, opted_in: str
) -> None:
    ns = opted_in
    base = deployment("twice", ns, 1, 1)["spec"]["template"]
    opted_out = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "out", "namespace": ns, "labels": {"backdial.dev/inject": "false"}},
        "spec": base["spec"],
    }
    resp = crds.api.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", opted_out)
    assert resp.status == 201, resp.text
    assert "initContainers" not in resp.json()["spec"]
    first = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "once", "namespace": ns}}
    first["spec"] = base["spec"]
    resp = crds.api.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", first)
    injected = resp.json()
    # Create a pod from an already injected spec: the webhook changes nothing.
    again = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "again",
            "namespace": ns,
            "labels": injected["metadata"]["labels"],
            "annotations": injected["metadata"]["annotations"],
        },
        "spec": injected["spec"],
    }
    resp = crds.api.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", again)
    assert resp.status == 201, resp.text
    assert resp.json()["spec"]["initContainers"] == injected["spec"]["initContainers"]
    assert resp.json()["spec"]["containers"] == injected["spec"]["containers"]


def test_pod_created_while_the_operator_is_down_is_refused_then_created(
    operator: OperatorEnv, crds: harness.Cluster, opted_in: str
) -> None:
    """failurePolicy Fail (docs/injection.md): refused while down; the ReplicaSet retries."""
    ns = opted_in
    operator.operator.stop()
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "early", "namespace": ns},
            "spec": deployment("x", ns, 1, 1)["spec"]["template"]["spec"],
        }
        resp = crds.api.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)
        assert resp.status >= 500 or resp.status == 400, resp.text
        assert "namespace.inject.backdial.dev" in resp.text
        crds.apply(deployment("late", ns, 1, 1))
        wait_for(
            lambda: any(
                e.get("reason") == "FailedCreate"
                for e in crds.get_json(f"/api/v1/namespaces/{ns}/events")["items"]
            ),
            timeout=30,
            what="FailedCreate event",
        )
        assert pods(crds, ns, "late") == []
    finally:
        operator.operator.start()
    wait_ready(crds, ns, "late", 1, timeout=120)
    assert pods(crds, ns, "late")[0]["spec"]["initContainers"][0]["name"] == "backdial-acceptor"


def test_ca_bundles_are_the_operators_and_restored_at_start(
    operator: OperatorEnv, crds: harness.Cluster
) -> None:
    ca = base64.b64encode(operator.ca.read_bytes()).decode()
    assert wiring.bundles(crds) == [ca] * 4  # patched in when the objects appeared
    request = wiring.requester(crds)
    operator.operator.stop()  # nobody else patches while we look
    try:
        assert asyncio.run(patch_bundles(request, operator.ca.read_bytes())) == (3, 0)
        assert asyncio.run(patch_bundles(request, OTHER_CA)) == (3, 3)  # e.g. a helm upgrade
        assert wiring.bundles(crds) == [base64.b64encode(OTHER_CA).decode()] * 4
        hooks = crds.get_json(WEBHOOK_CONFIG_PATH)["webhooks"]
        assert [h["failurePolicy"] for h in hooks] == ["Fail", "Fail"]  # the rest untouched
    finally:
        operator.operator.start()
    wait_for(lambda: wiring.bundles(crds) == [ca] * 4, timeout=30, what="CA bundles restored")


# -- drain --------------------------------------------------------------------------------------
def test_scale_down_under_load_fails_nothing(
    operator: OperatorEnv, crds: harness.Cluster, opted_in: str
) -> None:
    ns = opted_in
    crds.apply([deployment("shrink", ns, 3, 2), service("shrink", ns)])
    wait_ready(crds, ns, "shrink", 3)
    with EndpointLoad(crds, ns, "shrink", "/delay?ms=20", clients=6) as load:
        wait_for(lambda: load.total > 50, what="load flowing")
        crds.kubectl("scale", "-n", ns, "deployment/shrink", "--replicas=1")
        wait_ready(crds, ns, "shrink", 1, timeout=60)  # the two others drained and are gone
        before = load.total
        wait_for(lambda: load.total > before + 20, what="load continues")
    assert load.failures() == {}, load.codes
    assert load.total > 100


def test_deleting_a_pod_mid_request_lets_it_finish(
    operator: OperatorEnv, crds: harness.Cluster, opted_in: str
) -> None:
    ns = opted_in
    crds.apply(deployment("del", ns, 1, 1))
    wait_ready(crds, ns, "del", 1)
    pod = pods(crds, ns, "del")[0]
    ip, name = pod["status"]["podIP"], pod["metadata"]["name"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, ip, "/delay?ms=4000")
        wait_for(
            lambda: json.loads(get_admin(ip, "/v1/state"))["busy"] == 1, what="request in flight"
        )
        crds.kubectl("delete", "pod", "-n", ns, name, "--wait=false")
        status, body = slow.result(timeout=30)
    assert status == 200, body
    wait_for(
        lambda: all(p["metadata"]["name"] != name for p in pods(crds, ns, "del")),
        timeout=60,
        what="pod gone",
    )


def quantity_value(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def get_admin(ip: str, path: str) -> bytes:
    conn = http.client.HTTPConnection(ip, 9902, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


# -- autoscaling --------------------------------------------------------------------------------
def test_hpa_scales_up_on_queued_requests_and_back_down(
    operator: OperatorEnv, crds: harness.Cluster, opted_in: str, tmp_path: Path
) -> None:
    ns = opted_in
    crds.apply(
        {
            "apiVersion": "backdial.dev/v1alpha1",
            "kind": "SessionSlice",
            "metadata": {"name": "scale", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": "scale"}},
                "capacity": {"sessionsPerPod": 2},
                "slices": [{"name": "default", "share": 100, "queue": SLICE_CONFIG_QUEUE}],
                "autoscaling": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": "scale",
                    },
                    "minReplicas": 2,
                    "maxReplicas": 4,
                    "target": {"metric": "requestsWaiting", "averageValue": 2},
                    "behavior": {
                        "scaleUp": {
                            "stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 5}],
                        },
                        "scaleDown": {
                            "stabilizationWindowSeconds": 5,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 5}],
                        },
                    },
                },
            },
        }
    )
    crds.apply([deployment("scale", ns, 2, 2), service("scale", ns)])
    wait_ready(crds, ns, "scale", 2)
    hpa_path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/scale"
    wait_for(lambda: crds.api.request("GET", hpa_path).status == 200, what="HPA created")
    raw = (
        f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/backdial_requests_waiting"
        "?labelSelector=app%3Dscale"
    )
    started = time.monotonic()

    def per_pod() -> list[float]:
        doc = json.loads(crds.kubectl("get", "--raw", raw).stdout)
        assert all(i["describedObject"]["kind"] == "Pod" for i in doc["items"])
        return [quantity_value(i["value"]) for i in doc["items"]]

    with EndpointLoad(crds, ns, "scale", "/delay?ms=200", clients=40) as load:
        peak: list[float] = []

        def queued() -> bool:
            values = per_pod()
            if len(values) == 2 and sum(values) > 20:
                peak.append(sum(values) / 2)
                return True
            return False

        wait_for(queued, timeout=30, what="requests queue at 2 pods")
        wait_ready(crds, ns, "scale", 4, timeout=90)
        scaled_after = time.monotonic() - started
        # Four pods share the queue: the average per pod the HPA sees falls.
        wait_for(
            lambda: len(v := per_pod()) == 4 and sum(v) / 4 < peak[0] * 0.75,
            timeout=60,
            what="waiting per pod falls",
        )
        status = crds.get_json(f"/apis/backdial.dev/v1alpha1/namespaces/{ns}/sessionslices/scale")[
            "status"
        ]
        assert status["selectedPods"] == 4 and status["perPodSessions"] == 2
        # The HPA controller found the metric; the SessionSlice says so (ScalingActive).
        wait_for(
            lambda: (
                condition(slice_status(crds, ns, "scale"), "ScalingActive").get("reason")
                == "ValidMetricFound"
            ),
            timeout=20,
            what="ScalingActive True (ValidMetricFound)",
        )
        assert condition(slice_status(crds, ns, "scale"), "ScalingActive")["status"] == "True"
        hpa = crds.get_json(hpa_path)
        assert hpa["status"]["desiredReplicas"] == 4
        current = hpa["status"]["currentMetrics"][0]["pods"]
        assert current["metric"]["name"] == "backdial_requests_waiting"
    assert load.failures() == {}, load.codes
    assert scaled_after < 90
    wait_for(
        lambda: crds.get_json(hpa_path)["status"].get("desiredReplicas") == 2,
        timeout=90,
        what="HPA back to 2",
    )
    wait_ready(crds, ns, "scale", 2, timeout=90)


def test_metrics_api_refuses_a_foreign_client_certificate(
    operator: OperatorEnv, crds: harness.Cluster, tmp_path: Path
) -> None:
    import ssl

    from tests.operator.tlsutil import make_ca, make_leaf

    rogue_ca = make_ca(tmp_path, "rogue")
    client = make_leaf(tmp_path, rogue_ca, "client", "front-proxy-client", server=False)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(client.cert, client.key)
    conn = http.client.HTTPSConnection("127.0.0.1", operator.metrics_port, context=ctx, timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        conn.request("GET", "/apis/custom.metrics.k8s.io/v1beta2")
        conn.getresponse().read()
    conn.close()
    # The aggregator's own certificate still works: the API answers through kube-apiserver.
    doc = json.loads(crds.kubectl("get", "--raw", "/apis/custom.metrics.k8s.io/v1beta2").stdout)
    assert doc["groupVersion"] == "custom.metrics.k8s.io/v1beta2"
