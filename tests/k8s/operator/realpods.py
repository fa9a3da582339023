"""Pods that really run on the process node: acceptor, sidecar and demo as containers.

The containers are what the webhook would inject (issue 9), written out by hand so these
tests depend on the operator alone: the acceptor dials the operator through the Service
``backdial-operator`` with the pod's projected ServiceAccount token (audience ``backdial``,
bound to the pod by the process kubelet through the TokenRequest API) and the operator's
CA from a ConfigMap; the sidecar serves port 8080 and is ready with a session registered;
the demo registers ``--sessions N``.  Tests dial pod IPs (127.42.0.0/16) only.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

import harness

from tests.k8s.operator.opstack import INJECTED, OPERATOR_HOST, AcceptorView, OperatorEnv

IMAGE = f"{harness.DEFAULT_PROJECT_IMAGE}:0.1.0"
PORT, ACCEPTOR_ADMIN, SIDECAR_ADMIN = 8080, 9901, 9902
RUN = "/var/run/backdial"
TOKEN_DIR = "/var/run/secrets/backdial"
CA_DIR = "/etc/backdial/operator-ca"


def ca_configmap(env: OperatorEnv, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "backdial-operator-ca", "namespace": namespace},
        "data": {"ca.crt": env.ca.read_text()},
    }


def pod_spec(env: OperatorEnv, sessions: int) -> dict[str, Any]:
    mounts = [{"name": "backdial-run", "mountPath": RUN}]
    acceptor = {
        "name": "backdial-acceptor",
        "image": IMAGE,
        "args": [
            "acceptor",
            "--run-dir",
            RUN,
            "--admin",
            f"0.0.0.0:{ACCEPTOR_ADMIN}",
            "--operator",
            f"https://{OPERATOR_HOST}:{env.config_port}",
            "--operator-ca",
            f"{CA_DIR}/ca.crt",
            "--token-file",
            f"{TOKEN_DIR}/token",
        ],
        "volumeMounts": [
            *mounts,
            {"name": "backdial-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "operator-ca", "mountPath": CA_DIR, "readOnly": True},
        ],
    }
    sidecar = {
        "name": "backdial-sidecar",
        "image": IMAGE,
        "args": [
            "sidecar",
            "--run-dir",
            RUN,
            "--listen",
            f"0.0.0.0:{PORT}",
            "--admin",
            f"0.0.0.0:{SIDECAR_ADMIN}",
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": SIDECAR_ADMIN},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
        "volumeMounts": mounts,
    }
    app = {
        "name": "app",
        "image": IMAGE,
        "args": [
            "serve",
            "backdial.demo:app",
            "--register",
            f"unix://{RUN}/register.sock",
            "--sessions",
            str(sessions),
            "--service",
            "demo",
        ],
        "volumeMounts": mounts,
    }
    token = {
        "serviceAccountToken": {"audience": "backdial", "expirationSeconds": 3600, "path": "token"}
    }
    return {
        "containers": [acceptor, sidecar, app],
        "terminationGracePeriodSeconds": 5,
        "volumes": [
            {"name": "backdial-run", "emptyDir": {}},
            {"name": "backdial-token", "projected": {"sources": [token]}},
            {"name": "operator-ca", "configMap": {"name": "backdial-operator-ca"}},
        ],
    }


def deployment(env: OperatorEnv, namespace: str, name: str, replicas: int, sessions: int) -> Any:
    return [
        ca_configmap(env, namespace),
        harness.process_deployment(
            name, namespace, replicas, pod_spec(env, sessions), pod_labels=INJECTED
        ),
    ]


@dataclass(frozen=True)
class RealPod(AcceptorView):
    name: str
    ip: str

    @property
    def acceptor_admin(self) -> str:  # type: ignore[override]
        return f"{self.ip}:{ACCEPTOR_ADMIN}"

    @property
    def port(self) -> int:
        return PORT

    def _call(self, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
        conn = http.client.HTTPConnection(self.ip, PORT, timeout=30)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get(self, path: str, headers: dict[str, str] | None = None) -> int:
        status: int = self._call("GET", path, headers)[0]
        return status

    def demo_stats(self) -> Any:
        return json.loads(self._call("GET", "/stats")[1])

    def reset_stats(self) -> None:
        self._call("POST", "/stats/reset")


def ready_pods(cluster: harness.Cluster, namespace: str, app: str, count: int) -> list[RealPod]:
    """The *count* Ready pods of *app* (and no others), sorted by name."""

    def probe() -> list[RealPod] | None:
        items = cluster.get_json(f"/api/v1/namespaces/{namespace}/pods?labelSelector=app%3D{app}")
        pods = [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]
        ready = [
            p
            for p in pods
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        ]
        if len(ready) != count or len(pods) != count:
            return None
        return sorted(
            (RealPod(p["metadata"]["name"], p["status"]["podIP"]) for p in ready),
            key=lambda r: r.name,
        )

    found: list[RealPod] = harness.poll(probe, timeout=90, interval=0.25, what=f"{count} {app}")
    return found
