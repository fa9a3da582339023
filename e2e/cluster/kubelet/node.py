"""The process node's Node object and its Lease: registration and heartbeats.

The Node carries the process-node label and taint (SHAPES.md §1) and reports Ready. The
Lease in ``kube-node-lease`` is renewed every ``LEASE_RENEW`` seconds, which is what the
node lifecycle controller watches; the Ready condition's heartbeat is refreshed less often.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from kubernetes_asyncio import client

from . import NODE_KIND_LABEL, NODE_KIND_PROCESS, TAINT_EFFECT, TAINT_KEY, TAINT_VALUE
from .informer import ApiError, call
from .plan import Obj

log = logging.getLogger("kubelet.node")

LEASE_SECONDS = 40
LEASE_RENEW = 10.0
STATUS_EVERY = 60.0
CAPACITY = {"cpu": "8", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
VERSION = "v1.36.3-backdial-proc"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_object(name: str, host_ip: str) -> Obj:
    """The Node as registered (spec and metadata)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                NODE_KIND_LABEL: NODE_KIND_PROCESS,
            },
        },
        "spec": {"taints": [{"key": TAINT_KEY, "value": TAINT_VALUE, "effect": TAINT_EFFECT}]},
    }


def node_status(name: str, host_ip: str, started: str) -> Obj:
    """The Node status: Ready, no pressure, capacity, addresses, node info."""
    stamp = now_rfc3339()

    def cond(kind: str, status: str, reason: str, message: str) -> Obj:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": started,
        }

    return {
        "capacity": CAPACITY,
        "allocatable": CAPACITY,
        "addresses": [
            {"type": "InternalIP", "address": host_ip},
            {"type": "Hostname", "address": name},
        ],
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory limits"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk limits"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "no pid limits"),
            cond("Ready", "True", "KubeletReady", "backdial process kubelet is posting ready"),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": VERSION,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "backdial-proc://1",
            "kernelVersion": "",
            "osImage": "backdial process node",
            "machineID": "",
            "bootID": "",
            "systemUUID": "",
        },
    }


class NodeAgent:
    """Registers the Node and keeps it and its Lease fresh."""

    def __init__(self, api: client.ApiClient, name: str, host_ip: str) -> None:
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.name = name
        self.host_ip = host_ip
        self.started = now_rfc3339()
        self.uid = ""

    async def register(self) -> None:
        """Create (or take over) the Node and post its status."""
        try:
            created = await call(self.core.create_node, node_object(self.name, self.host_ip))
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = await call(
                self.core.patch_node,
                self.name,
                node_object(self.name, self.host_ip),
                _content_type="application/merge-patch+json",
            )
        self.uid = created["metadata"]["uid"]
        await self.post_status()
        await self.renew_lease()

    async def post_status(self) -> None:
        await call(
            self.core.patch_node_status,
            self.name,
            {"status": node_status(self.name, self.host_ip, self.started)},
            _content_type="application/merge-patch+json",
        )

    def _lease(self, version: str | None) -> Obj:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": "kube-node-lease",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}
            ],
        }
        if version:
            meta["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_micro(),
            },
        }

    async def renew_lease(self) -> None:
        try:
            current = await call(
                self.coordination.read_namespaced_lease, self.name, "kube-node-lease"
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
            await call(
                self.coordination.create_namespaced_lease, "kube-node-lease", self._lease(None)
            )
            return
        version = current["metadata"]["resourceVersion"]
        await call(
            self.coordination.replace_namespaced_lease,
            self.name,
            "kube-node-lease",
            self._lease(version),
        )

    async def heartbeat(self) -> None:
        """Renew the Lease and refresh the status forever (cancel to stop)."""
        loop = asyncio.get_running_loop()
        last_status = loop.time()
        while True:
            await asyncio.sleep(LEASE_RENEW)
            try:
                await self.renew_lease()
                if loop.time() - last_status >= STATUS_EVERY:
                    await self.post_status()
                    last_status = loop.time()
            except Exception as exc:  # keep beating; the next round may succeed
                log.warning("heartbeat failed: %s", exc)
