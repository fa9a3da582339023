"""The control-plane components one by one: their loopback ports, their command lines (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kwok), their health probes, and the
fake kwok nodes."""

from __future__ import annotations

import http.client
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from apiclient import ApiClient
from binaries import HERE
from certs import PKI
from util import HarnessError

KWOK_STAGES = HERE / "kwok" / "stages.yaml"

#: Annotation (key and value) marking the Node objects that kwok manages.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"


@dataclass
class Endpoints:
    """Loopback ports of one control plane."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int


# --------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------


def etcd_args(workdir: Path, ep: Endpoints) -> list[str]:
    """Arguments of etcd: one member on loopback, data in ``workdir/etcd``."""
    client = f"http://127.0.0.1:{ep.etcd_client}"
    peer = f"http://127.0.0.1:{ep.etcd_peer}"
    return [
        "--name=backdial",
        f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=backdial={peer}",
        "--initial-cluster-state=new",
        "--unsafe-no-fsync=true",  # throw-away test data: durability is not needed
        "--log-level=warn",
    ]


def apiserver_args(
    workdir: Path, ep: Endpoints, pki: PKI, service_cidr: str, verbosity: int
) -> list[str]:
    """Arguments of kube-apiserver: RBAC, service-account tokens, the aggregation layer."""
    return [
        f"--etcd-servers=http://127.0.0.1:{ep.etcd_client}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ep.apiserver}",
        f"--cert-dir={workdir / 'run'}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        f"--service-cluster-ip-range={service_cidr}",
        # The `kubernetes` Service would get 127.0.0.1 as endpoint, which Endpoints
        # validation rejects (loopback); nothing in-cluster needs to reach it here.
        "--endpoint-reconciler-type=none",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        # Aggregation layer: front-proxy client identity and request-header authn.
        f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        "--enable-aggregator-routing=true",
        "--profiling=false",
        f"--v={verbosity}",
    ]


def _component_common_args(
    workdir: Path, kubeconfig: Path, port: int, name: str, verbosity: int
) -> list[str]:
    cert_dir = workdir / "run" / f"{name}-certs"
    cert_dir.mkdir(parents=True, exist_ok=True)
    return [
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--profiling=false",
        f"--v={verbosity}",
    ]


def controller_manager_args(
    workdir: Path,
    ep: Endpoints,
    pki: PKI,
    service_cidr: str,
    hpa_sync_period: str,
    verbosity: int,
) -> list[str]:
    """Arguments of kube-controller-manager: every default controller, no leader election."""
    kubeconfig = workdir / "run" / "controller-manager.kubeconfig"
    return [
        f"--kubeconfig={kubeconfig}",
        *_component_common_args(
            workdir, kubeconfig, ep.controller_manager, "controller-manager", verbosity
        ),
        "--leader-elect=false",
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--root-ca-file={pki.ca.cert}",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={service_cidr}",
        f"--horizontal-pod-autoscaler-sync-period={hpa_sync_period}",
    ]


def scheduler_args(workdir: Path, ep: Endpoints, verbosity: int) -> list[str]:
    """Arguments of kube-scheduler; writes its configuration file into ``workdir/run``."""
    kubeconfig = workdir / "run" / "scheduler.kubeconfig"
    config = workdir / "run" / "scheduler-config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(kubeconfig)},
                "leaderElection": {"leaderElect": False},
            }
        )
    )
    return [
        f"--config={config}",
        *_component_common_args(workdir, kubeconfig, ep.scheduler, "scheduler", verbosity),
    ]


def kwok_args(workdir: Path, pod_cidr: str) -> list[str]:
    """Arguments of kwok: manage only the nodes carrying the kwok annotation."""
    selector = f"{KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}"
    return [
        f"--kubeconfig={workdir / 'run' / 'kwok.kubeconfig'}",
        f"--config={KWOK_STAGES}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={selector}",
        "--node-lease-duration-seconds=40",
        # Fake pod IPs written into pod status; nothing is ever sent to them.
        f"--cidr={pod_cidr}",
    ]


def kubelet_args(
    workdir: Path, logs_dir: Path, node_name: str, pod_cidr: str, project_images: Sequence[str]
) -> list[str]:
    """Command line of the process kubelet (``e2e/cluster/kubelet``), run by this Python."""
    images = [f"--project-image={image}" for image in project_images]
    return [
        sys.executable,
        "-m",
        "kubelet",
        f"--kubeconfig={workdir / 'run' / 'kubelet.kubeconfig'}",
        f"--node-name={node_name}",
        f"--pod-cidr={pod_cidr}",
        f"--state-dir={workdir / 'kubelet' / node_name}",
        f"--log-dir={logs_dir}",
        *images,
    ]


# --------------------------------------------------------------------------------------------
# Health probes (``None`` means "not yet", for :func:`util.poll`)
# --------------------------------------------------------------------------------------------


def etcd_healthy(port: int) -> bool | None:
    """Whether etcd's ``/health`` on ``port`` reports healthy."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        healthy = response.status == 200 and b'"true"' in response.read()
    except OSError:
        return None
    finally:
        conn.close()
    return True if healthy else None


def apiserver_ready(api: ApiClient) -> bool | None:
    """Whether the API server's ``/readyz`` answers 200."""
    try:
        response = api.request("GET", "/readyz", timeout=5)
    except (OSError, http.client.HTTPException):
        return None
    return True if response.status == 200 else None


def component_healthy(port: int) -> bool | None:
    """Whether the ``/healthz`` of the controller-manager or scheduler on ``port`` is 200."""
    # Self-signed serving certificate generated by the component itself.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return True if ok else None


def node_ready(api: ApiClient, name: str) -> bool | None:
    """Whether Node ``name`` has condition Ready=True."""
    response = api.request("GET", f"/api/v1/nodes/{name}")
    if response.status != 200:
        return None
    conditions = response.json().get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return True if ready else None


def default_service_account(api: ApiClient) -> bool | None:
    """Whether the ``default`` ServiceAccount of namespace ``default`` exists."""
    response = api.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
    return True if response.status == 200 else None


# --------------------------------------------------------------------------------------------
# Fake nodes
# --------------------------------------------------------------------------------------------


def create_node(api: ApiClient, name: str) -> None:
    """Create a Node object that kwok manages (an existing one is fine)."""
    resources = {"cpu": "32", "memory": "128Gi", "pods": "110"}
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        # Deliberately not tainted, so ordinary pods schedule onto the fake node.
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources},
    }
    response = api.request("POST", "/api/v1/nodes", node)
    if response.status not in (201, 409):
        raise HarnessError(f"creating node {name}: HTTP {response.status}: {response.text}")
