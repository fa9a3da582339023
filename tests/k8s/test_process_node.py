"""The process node (e2e/cluster/kubelet) on the real control plane: pods whose containers
really run, with pod IPs in 127.42.0.0/16, probes, restarts, graceful deletion, volumes,
in-cluster API access and the emptyDir/ImageNotRunnable rules (issue 7, "Done when")."""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import time
import uuid
from typing import Any

import harness
import pytest

pytestmark = pytest.mark.k8s

IMAGE = f"{harness.DEFAULT_PROJECT_IMAGE}:0.1.0"
POD_NET = ipaddress.ip_network(harness.PROCESS_POD_CIDR)


def _container(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, **fields}


def _pod(name: str, ns: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": harness.place_on_process_node({"containers": containers, **spec}),
    }


def _service(name: str, ns: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": port}]},
    }


def _pods(cluster: harness.Cluster, ns: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        f"/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{app}"
    )["items"]
    return items


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _wait_ready(cluster: harness.Cluster, ns: str, app: str, count: int) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        pods = [p for p in _pods(cluster, ns, app) if not p["metadata"].get("deletionTimestamp")]
        ready = [p for p in pods if _ready(p)]
        return ready if len(ready) == count == len(pods) else None

    return harness.poll(probe, timeout=60, interval=0.25, what=f"{count} ready pods of {app}")


def _get(ip: str, port: int, path: str = "/", method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(ip, port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _slice_addresses(cluster: harness.Cluster, ns: str, service: str) -> dict[str, bool]:
    """Address → ready, over the Service's EndpointSlices."""
    slices = cluster.get_json(
        f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
        f"?labelSelector=kubernetes.io%2Fservice-name%3D{service}"
    )["items"]
    return {
        address: bool((endpoint.get("conditions") or {}).get("ready"))
        for item in slices
        for endpoint in item.get("endpoints") or []
        for address in endpoint["addresses"]
    }


def _wait_slice(
    cluster: harness.Cluster, ns: str, service: str, ready_ips: set[str]
) -> dict[str, bool]:
    def probe() -> dict[str, bool] | None:
        found = _slice_addresses(cluster, ns, service)
        return found if {ip for ip, ok in found.items() if ok} == ready_ips else None

    return harness.poll(probe, timeout=60, interval=0.25, what=f"EndpointSlice of {service}")


def _pod_ip(pod: dict[str, Any]) -> str:
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in POD_NET
    return str(ip)


# --------------------------------------------------------------------------------------------


def test_demo_deployment_runs_on_pod_ips_and_scales(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """The demo app (project image, 0.0.0.0 rewritten) is Ready, answers on its pod IP;
    scaled to 3 it gives 3 distinct reachable IPs, all listed ready in the EndpointSlice."""
    ns = k8s_namespace
    container = _container(
        "app",
        args=["serve", "backdial.demo:app", "--listen", "0.0.0.0:8080"],
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    )
    k8s_cluster.apply(
        [
            harness.process_deployment("demo", ns, 1, {"containers": [container]}),
            _service("demo", ns, 8080),
        ]
    )
    (pod,) = _wait_ready(k8s_cluster, ns, "demo", 1)
    assert pod["spec"]["nodeName"] == harness.PROCESS_NODE_NAME
    status, body = _get(_pod_ip(pod), 8080)
    assert status == 200 and body, body
    assert "listening on http://" + _pod_ip(pod) + ":8080" in k8s_cluster.pod_logs(
        pod["metadata"]["name"], namespace=ns
    )

    k8s_cluster.kubectl("-n", ns, "scale", "deployment/demo", "--replicas=3")
    pods = _wait_ready(k8s_cluster, ns, "demo", 3)
    ips = {_pod_ip(p) for p in pods}
    assert len(ips) == 3
    for ip in ips:
        assert _get(ip, 8080)[0] == 200
    found = _wait_slice(k8s_cluster, ns, "demo", ips)
    assert set(found) == ips


PROBED_APP = """
import http.server, os, sys
state = {"ready": True, "live": True}
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def do_GET(self):
        ok = state.get(self.path.strip("/"), False)
        self.send_response(200 if ok else 503); self.end_headers()
    def do_POST(self):
        state[self.path.strip("/")] = False
        self.send_response(204); self.end_headers()
print("started", flush=True)
http.server.HTTPServer((os.environ["LISTEN"], 8080), H).serve_forever()
"""


def test_readiness_failure_leaves_the_slice_and_liveness_failure_restarts(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """Readiness failing marks the endpoint not ready; liveness failing restarts the
    container (restartCount rises) and the new run is ready again."""
    ns = k8s_namespace
    container = _container(
        "app",
        command=["python", "-c", PROBED_APP],
        env=[{"name": "LISTEN", "value": "0.0.0.0"}],
        readinessProbe={
            "httpGet": {"path": "/ready", "port": 8080},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
        livenessProbe={
            "httpGet": {"path": "/live", "port": 8080},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
    )
    k8s_cluster.apply(
        [
            _pod("probed", ns, [container], terminationGracePeriodSeconds=2),
            _service("probed", ns, 8080),
        ]
    )
    (pod,) = _wait_ready(k8s_cluster, ns, "probed", 1)
    ip = _pod_ip(pod)
    _wait_slice(k8s_cluster, ns, "probed", {ip})

    assert _get(ip, 8080, "/ready", "POST")[0] == 204
    found = _wait_slice(k8s_cluster, ns, "probed", set())
    assert found == {ip: False}  # still listed, not ready

    assert _get(ip, 8080, "/live", "POST")[0] == 204

    def restarted() -> dict[str, Any] | None:
        current = k8s_cluster.get_json(f"/api/v1/namespaces/{ns}/pods/probed")
        status = current["status"]["containerStatuses"][0]
        return current if status["restartCount"] >= 1 and _ready(current) else None

    current = harness.poll(restarted, timeout=60, interval=0.25, what="a liveness restart")
    status = current["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] != 0
    assert current["status"]["podIP"] == ip  # same pod, same sandbox
    _wait_slice(k8s_cluster, ns, "probed", {ip})
    assert k8s_cluster.pod_logs("probed", namespace=ns).count("started") == 2


def test_start_order_and_deletion_prestop_sigterm_kill_sidecars_last(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """Start: the init container runs first, the app starts only once the native sidecar's
    startup probe passed. Deletion: preStop, then SIGTERM; an app ignoring SIGTERM is
    killed after the grace period; the sidecar gets SIGTERM only after that; the pod
    object then goes away and no process is left."""
    ns = k8s_namespace
    marker = uuid.uuid4().hex
    shared = [{"name": "shared", "mountPath": "/shared"}]
    init = _container(
        "init", command=["sh", "-c", "echo init-done > /shared/init"], volumeMounts=shared
    )
    sidecar = _container(
        "side",
        restartPolicy="Always",
        command=[
            "python",
            "-c",
            "import signal, sys, time\n"
            "def term(*a):\n    print('side-term', time.time(), flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, term)\nprint('side-up', flush=True)\n"
            "time.sleep(1)\nprint('side-ready', time.time(), flush=True)\n"
            "open('/shared/ready', 'w').close()\n"
            "while True: time.sleep(1)\n",
        ],
        volumeMounts=shared,
        startupProbe={"exec": {"command": ["test", "-f", "/shared/ready"]}, "periodSeconds": 1},
    )
    app = _container(
        "app",
        command=[
            "python",
            "-c",
            f"# {marker}\nimport signal, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: print('app-term', time.time(), flush=True))\n"
            "print('app-up', time.time(), open('/shared/init').read().strip(), flush=True)\n"
            "while True: time.sleep(0.1)\n",
        ],
        volumeMounts=shared,
        lifecycle={"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /proc/1/fd/1"]}}},
    )
    k8s_cluster.apply(
        _pod(
            "graceful",
            ns,
            [app],
            initContainers=[init, sidecar],
            terminationGracePeriodSeconds=2,
            volumes=[{"name": "shared", "emptyDir": {}}],
        )
    )
    (pod,) = _wait_ready(k8s_cluster, ns, "graceful", 1)
    init_status, side_status = pod["status"]["initContainerStatuses"]
    assert init_status["state"]["terminated"]["reason"] == "Completed"
    assert side_status["started"] is True and "running" in side_status["state"]
    uid = pod["metadata"]["uid"]

    def app_up() -> bool | None:  # Ready (no probe) may come before Python set its handler
        return True if "app-up" in k8s_cluster.pod_logs("graceful", "app", namespace=ns) else None

    harness.poll(app_up, timeout=30, interval=0.1, what="the app's SIGTERM handler")
    started = time.monotonic()
    k8s_cluster.kubectl("-n", ns, "delete", "pod", "graceful", "--wait=true", "--timeout=60s")
    assert time.monotonic() - started >= 2.0  # the grace period was waited out
    gone = k8s_cluster.api.request("GET", f"/api/v1/namespaces/{ns}/pods/graceful")
    assert gone.status == 404 or gone.json()["metadata"]["uid"] != uid

    def lines(container: str) -> list[list[str]]:
        text = k8s_cluster.pod_logs("graceful", container, namespace=ns)
        return [line.split() for line in text.splitlines()]

    app_log, side_log = lines("app"), lines("side")
    assert [line[0] for line in app_log] == ["app-up", "prestop", "app-term"]
    assert [line[0] for line in side_log] == ["side-up", "side-ready", "side-term"]
    assert app_log[0][2] == "init-done"  # the init container ran first, in the same emptyDir
    assert float(app_log[0][1]) >= float(side_log[1][1])  # after the sidecar's startup
    # The hook ran before SIGTERM (log order); the sidecar was stopped after the app, and
    # the app had the whole grace period.
    assert float(side_log[2][1]) - float(app_log[2][1]) >= 1.5
    assert harness.processes_matching(marker) == []


def test_configmap_volume_follows_updates(k8s_cluster: harness.Cluster, k8s_namespace: str) -> None:
    """A configMap volume is rewritten when the ConfigMap changes (readiness reads it)."""
    ns = k8s_namespace
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": ns},
        "data": {"mode": "on"},
    }
    watcher = _container(
        "watcher",
        command=["sleep", "1000"],
        volumeMounts=[{"name": "settings", "mountPath": "/etc/settings", "readOnly": True}],
        readinessProbe={
            "exec": {"command": ["grep", "-qx", "on", "/etc/settings/mode"]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    )
    volume = {"name": "settings", "configMap": {"name": "settings"}}
    k8s_cluster.apply([configmap, _pod("watcher", ns, [watcher], volumes=[volume])])
    _wait_ready(k8s_cluster, ns, "watcher", 1)
    k8s_cluster.apply({**configmap, "data": {"mode": "off"}})

    def unready() -> bool | None:
        pod = k8s_cluster.get_json(f"/api/v1/namespaces/{ns}/pods/watcher")
        return True if not _ready(pod) else None

    assert harness.poll(unready, timeout=30, interval=0.25, what="the pod to see the new value")


def test_emptydir_shared_within_a_pod_not_across_pods(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """Two containers of a pod share an emptyDir; two pods of a Deployment do not."""
    ns = k8s_namespace
    pod_name_env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    mount = [{"name": "data", "mountPath": "/data"}]
    writer = _container(
        "writer",
        command=["sh", "-c", "echo hi > /data/$(POD_NAME) && exec sleep 1000"],
        env=pod_name_env,
        volumeMounts=mount,
    )
    reader = _container(
        "reader",
        command=["sh", "-c", "while true; do echo seen: $(ls /data); sleep 0.2; done"],
        env=pod_name_env,
        volumeMounts=mount,
        readinessProbe={
            "exec": {"command": ["sh", "-c", 'test "$(ls /data)" = "$POD_NAME"']},
            "periodSeconds": 1,
        },
    )
    spec = {"containers": [writer, reader], "volumes": [{"name": "data", "emptyDir": {}}]}
    k8s_cluster.apply(harness.process_deployment("shared", ns, 2, spec))
    pods = _wait_ready(k8s_cluster, ns, "shared", 2)
    for pod in pods:
        name = pod["metadata"]["name"]

        def last_line(name: str = name) -> str | None:
            lines = k8s_cluster.pod_logs(name, "reader", namespace=ns).splitlines()
            return lines[-1] if lines and lines[-1].startswith("seen: ") else None

        assert (
            harness.poll(last_line, timeout=10, interval=0.2, what="reader output")
            == f"seen: {name}"
        )


def test_volume_sources_stay_reachable_and_a_missing_one_fails_its_container(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """An emptyDir at /tmp covers the pod's own directories in the host's /tmp (where the
    other volumes' sources are): the other volume still mounts, and the mount point that
    does not exist is made for the container only. A hostPath volume whose path does not
    exist fails its container with CreateContainerError; nothing appears on the host."""
    ns = k8s_namespace
    tag = uuid.uuid4().hex[:8]
    run_dir, missing = f"/var/run/backdial-test-{tag}", f"/tmp/backdial-no-such-dir-{tag}"
    app = _container(
        "app",
        command=["sh", "-c", f"echo ok > {run_dir}/f && exec sleep 1000"],
        volumeMounts=[
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "run", "mountPath": run_dir},
        ],
        readinessProbe={"exec": {"command": ["test", "-f", f"{run_dir}/f"]}, "periodSeconds": 1},
    )
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "run", "emptyDir": {}}]
    broken = _container(
        "broken",
        command=["sleep", "1000"],
        volumeMounts=[{"name": "host", "mountPath": f"/mnt/backdial-test-{tag}"}],
    )
    k8s_cluster.apply(
        [
            _pod("hidden", ns, [app], volumes=volumes),
            _pod("broken", ns, [broken], volumes=[{"name": "host", "hostPath": {"path": missing}}]),
        ]
    )
    _wait_ready(k8s_cluster, ns, "hidden", 1)

    def waiting() -> dict[str, Any] | None:
        pod = k8s_cluster.get_json(f"/api/v1/namespaces/{ns}/pods/broken")
        (status,) = pod["status"].get("containerStatuses") or [{}]
        state = (status.get("state") or {}).get("waiting") or {}
        return state if state.get("reason") == "CreateContainerError" else None

    state = harness.poll(waiting, timeout=30, interval=0.25, what="CreateContainerError")
    assert state["message"] == f"mount source {missing} does not exist"
    for path in (run_dir, missing, f"/mnt/backdial-test-{tag}"):
        assert not os.path.lexists(path), f"{path} was made on the host"


IN_CLUSTER_CLIENT = """
import asyncio, json, os, socket
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException

async def main():
    config.load_incluster_config()
    out = {"resolved": socket.gethostbyname("kubernetes.default.svc")}
    async with client.ApiClient() as api:
        core = client.CoreV1Api(api)
        ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
        own = "metadata.name=" + os.environ["POD"]
        pods = await core.list_namespaced_pod(ns, field_selector=own)
        out["listed"] = [p.metadata.name for p in pods.items]
        try:
            await core.list_namespaced_secret(ns)
            out["secrets"] = 200
        except ApiException as exc:
            out["secrets"] = exc.status
    out["token"] = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()
    out["backdial_token"] = open("/var/run/secrets/backdial/token").read()
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def test_in_cluster_client_uses_its_projected_token_and_rbac(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """In-cluster config works unchanged: the pod lists its own pod with its bound token
    and gets 403 for what its Role does not allow."""
    ns = k8s_namespace
    k8s_cluster.apply(
        harness.service_account_with_role(
            ns,
            "lister",
            "pod-lister",
            [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        )
    )
    client_container = _container(
        "client",
        command=["python", "-c", IN_CLUSTER_CLIENT],
        env=[{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        volumeMounts=[{"name": "backdial-token", "mountPath": "/var/run/secrets/backdial"}],
    )
    token_volume = {
        "name": "backdial-token",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": "backdial",
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                }
            ]
        },
    }
    k8s_cluster.apply(
        _pod(
            "incluster",
            ns,
            [client_container],
            serviceAccountName="lister",
            restartPolicy="Never",
            volumes=[token_volume],
        )
    )

    def finished() -> dict[str, Any] | None:
        pod = k8s_cluster.get_json(f"/api/v1/namespaces/{ns}/pods/incluster")
        phase = pod["status"].get("phase")
        return pod if phase in ("Succeeded", "Failed") else None

    pod = harness.poll(finished, timeout=60, interval=0.25, what="the in-cluster client to finish")
    log = k8s_cluster.pod_logs("incluster", namespace=ns)
    assert pod["status"]["phase"] == "Succeeded", log
    result = json.loads(log.strip().splitlines()[-1])
    assert result["resolved"] == "127.0.0.1"  # kubernetes.default.svc via the pod's /etc/hosts
    assert result["listed"] == ["incluster"]
    assert result["secrets"] == 403
    bound_pod = {"name": "incluster", "uid": pod["metadata"]["uid"]}
    claims = _claims(result["token"])
    assert claims["sub"] == f"system:serviceaccount:{ns}:lister"
    assert claims["kubernetes.io"]["pod"] == bound_pod
    custom = _claims(result["backdial_token"])  # the projected volume with an audience
    assert custom["aud"] == ["backdial"] and custom["kubernetes.io"]["pod"] == bound_pod
    assert custom["exp"] - custom["iat"] == 3600
    status = pod["status"]["containerStatuses"][0]
    assert status["state"]["terminated"]["exitCode"] == 0


def _claims(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return payload


def test_foreign_image_is_not_run(k8s_cluster: harness.Cluster, k8s_namespace: str) -> None:
    """A container whose image is not the project's waits with ImageNotRunnable; nothing
    of the pod runs (no pod IP, no logs)."""
    ns = k8s_namespace
    foreign = {"name": "web", "image": "nginx:1.27"}
    helper = _container("helper", command=["sleep", "1000"])
    k8s_cluster.apply(_pod("foreign", ns, [foreign, helper]))

    def waiting() -> dict[str, Any] | None:
        pod = k8s_cluster.get_json(f"/api/v1/namespaces/{ns}/pods/foreign")
        statuses = {s["name"]: s for s in pod["status"].get("containerStatuses") or []}
        reason = statuses.get("web", {}).get("state", {}).get("waiting", {}).get("reason")
        return pod if reason == harness.IMAGE_NOT_RUNNABLE else None

    pod = harness.poll(waiting, timeout=30, interval=0.25, what="ImageNotRunnable")
    statuses = {s["name"]: s for s in pod["status"]["containerStatuses"]}
    assert "nginx:1.27" in statuses["web"]["state"]["waiting"]["message"]
    assert "waiting" in statuses["helper"]["state"]
    assert pod["status"]["phase"] == "Pending"
    assert "podIP" not in pod["status"]
    with pytest.raises(harness.HarnessError, match="no logs"):
        k8s_cluster.pod_logs("foreign", "helper", namespace=ns)
    k8s_cluster.kubectl("-n", ns, "delete", "pod", "foreign", "--wait=true", "--timeout=30s")
