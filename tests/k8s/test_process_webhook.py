"""The API server reaches backends on the process node through Service endpoints
(aggregator routing), which needs the harness's relaxed loopback check: an admission
webhook and an aggregated API served by one TLS pod (docs/k8s-harness.md)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import harness
import pytest

pytestmark = pytest.mark.k8s

GROUP = "probe.backdial.dev"
API_SERVICE = f"v1alpha1.{GROUP}"

# One small TLS server: a validating webhook that denies everything it is sent, and the
# discovery document plus a list of an aggregated API group naming the pod that served it.
BACKEND = """
import http.server, json, os, socket, ssl
GROUP = "probe.backdial.dev/v1alpha1"
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_POST(self):
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.reply({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": review["request"]["uid"], "allowed": False,
                                 "status": {"code": 403, "message": "denied by "
                                            + socket.gethostname()}}})
    def do_GET(self):
        if self.path.split("?")[0] == "/apis/" + GROUP:
            self.reply({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP,
                        "resources": [{"name": "pings", "singularName": "ping",
                                       "namespaced": False, "kind": "Ping",
                                       "verbs": ["get", "list"]}]})
        elif self.path.split("?")[0] == "/apis/" + GROUP + "/pings":
            self.reply({"kind": "PingList", "apiVersion": GROUP, "metadata": {},
                        "items": [{"kind": "Ping", "apiVersion": GROUP,
                                   "metadata": {"name": socket.gethostname()}}]})
        else:
            self.send_response(404); self.end_headers()
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tls/tls.crt", "/tls/tls.key")
server = http.server.ThreadingHTTPServer((os.environ["LISTEN"], 8443), H)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def _self_signed(tmp: Path, dns: str) -> tuple[bytes, bytes]:
    """A self-signed serving certificate (it is its own CA) and its key."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(tmp / "tls.key"), "-out", str(tmp / "tls.crt"),
            "-subj", f"/CN={dns}", "-addext", f"subjectAltName=DNS:{dns}",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return (tmp / "tls.crt").read_bytes(), (tmp / "tls.key").read_bytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_loopback_endpoint_addresses_are_accepted(
    k8s_cluster: harness.Cluster, k8s_namespace: str
) -> None:
    """The patched API server stores an EndpointSlice with a 127.42.x.y address; the
    unspecified address is still refused."""
    path = f"/apis/discovery.k8s.io/v1/namespaces/{k8s_namespace}/endpointslices"

    def endpoint_slice(name: str, address: str) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "manual"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address]}],
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        }

    ok = k8s_cluster.api.request("POST", path, endpoint_slice("loop", "127.42.200.1"))
    assert ok.status == 201, ok.text
    assert ok.json()["endpoints"][0]["addresses"] == ["127.42.200.1"]
    bad = k8s_cluster.api.request("POST", path, endpoint_slice("zero", "0.0.0.0"))
    assert bad.status == 422, bad.text


def test_apiserver_reaches_webhook_and_aggregated_api_through_a_service(
    k8s_cluster: harness.Cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    ns = k8s_namespace
    cert, key = _self_signed(tmp_path, f"probe.{ns}.svc")
    pod_spec = harness.place_on_process_node(
        {
            "containers": [
                {
                    "name": "backend",
                    "image": harness.DEFAULT_PROJECT_IMAGE,
                    "command": ["python", "-c", BACKEND],
                    "env": [{"name": "LISTEN", "value": "0.0.0.0"}],
                    "volumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}],
                    "readinessProbe": {"tcpSocket": {"port": 8443}, "periodSeconds": 1},
                }
            ],
            "volumes": [{"name": "tls", "secret": {"secretName": "probe-tls"}}],
        }
    )
    k8s_cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "probe-tls", "namespace": ns},
                "type": "kubernetes.io/tls",
                "data": {"tls.crt": _b64(cert), "tls.key": _b64(key)},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "probe", "namespace": ns, "labels": {"app": "probe"}},
                "spec": pod_spec,
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "probe", "namespace": ns},
                "spec": {
                    "selector": {"app": "probe"},
                    "ports": [{"port": 443, "targetPort": 8443}],
                },
            },
        ]
    )

    def ready_endpoint() -> str | None:
        slices = k8s_cluster.get_json(
            f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
            "?labelSelector=kubernetes.io%2Fservice-name%3Dprobe"
        )["items"]
        ready = [
            a
            for s in slices
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for a in e["addresses"]
        ]
        return ready[0] if ready else None

    address = harness.poll(ready_endpoint, timeout=60, interval=0.25, what="a ready endpoint")
    pod = k8s_cluster.get_json(f"/api/v1/namespaces/{ns}/pods/probe")
    assert address == pod["status"]["podIP"] and address.startswith("127.42.")

    webhook_name = f"probe-{ns}"
    service_ref = {"namespace": ns, "name": "probe", "port": 443}
    try:
        k8s_cluster.apply(
            [
                {
                    "apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "ValidatingWebhookConfiguration",
                    "metadata": {"name": webhook_name},
                    "webhooks": [
                        {
                            "name": "probe.backdial.dev",
                            "clientConfig": {
                                "service": {**service_ref, "path": "/validate"},
                                "caBundle": _b64(cert),
                            },
                            "rules": [
                                {
                                    "apiGroups": [""],
                                    "apiVersions": ["v1"],
                                    "operations": ["CREATE"],
                                    "resources": ["configmaps"],
                                }
                            ],
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": ns}
                            },
                            "objectSelector": {"matchLabels": {"probe": "deny"}},
                            "failurePolicy": "Fail",
                            "sideEffects": "None",
                            "admissionReviewVersions": ["v1"],
                            "timeoutSeconds": 5,
                        }
                    ],
                },
                {
                    "apiVersion": "apiregistration.k8s.io/v1",
                    "kind": "APIService",
                    "metadata": {"name": API_SERVICE},
                    "spec": {
                        "group": GROUP,
                        "version": "v1alpha1",
                        "service": service_ref,
                        "caBundle": _b64(cert),
                        "groupPriorityMinimum": 1000,
                        "versionPriority": 15,
                    },
                },
            ]
        )
        configmaps = f"/api/v1/namespaces/{ns}/configmaps"

        def denied() -> str | None:
            body = {"metadata": {"name": "blocked", "labels": {"probe": "deny"}}}
            response = k8s_cluster.api.request("POST", configmaps, body)
            if response.status == 201:  # the configuration is not active yet
                k8s_cluster.api.request("DELETE", f"{configmaps}/blocked")
                return None
            message: str = response.json().get("message", "")
            # "denied by <hostname>": the pod named probe answered.
            return message if "denied by probe" in message else None

        message = harness.poll(denied, timeout=60, interval=0.5, what="the webhook's denial")
        assert 'admission webhook "probe.backdial.dev" denied the request' in message
        allowed = k8s_cluster.api.request("POST", configmaps, {"metadata": {"name": "fine"}})
        assert allowed.status == 201, allowed.text

        def available() -> bool | None:
            service = k8s_cluster.get_json(
                f"/apis/apiregistration.k8s.io/v1/apiservices/{API_SERVICE}"
            )
            conditions = service.get("status", {}).get("conditions") or []
            ok = any(c["type"] == "Available" and c["status"] == "True" for c in conditions)
            return True if ok else None

        harness.poll(available, timeout=60, interval=0.5, what=f"APIService {API_SERVICE}")
        pings = k8s_cluster.get_json(f"/apis/{GROUP}/v1alpha1/pings")
        assert [item["metadata"]["name"] for item in pings["items"]] == ["probe"]
    finally:
        k8s_cluster.kubectl(
            "delete",
            f"validatingwebhookconfiguration/{webhook_name}",
            f"apiservice/{API_SERVICE}",
            "--ignore-not-found",
            "--wait=false",
        )
