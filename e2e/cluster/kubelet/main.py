"""The process kubelet: wiring and command line (``python -m kubelet --kubeconfig ...``).

It registers its Node, keeps the Lease fresh, caches the ConfigMaps, Secrets and
EndpointSlices its pods need (list+watch), watches the pods bound to its node and gives
each one a :class:`~kubelet.podworker.PodWorker`. SIGTERM/SIGINT stop every container
(briefly, without preStop hooks) and exit; pod objects are left as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from kubernetes_asyncio import client, config

from . import DEFAULT_POD_CIDR, DEFAULT_PROJECT_IMAGE, NODE_NAME
from .addresses import DEFAULT_CLAIMS_DIR, AddressClaims
from .hosts import ServiceMap, service_map
from .informer import ApiError, Informer, call
from .node import NodeAgent
from .plan import IpPool, Obj
from .podworker import Config, PodWorker
from .policy import Backoff
from .process import missing_tools

log = logging.getLogger("kubelet")

TERMINAL = ("Succeeded", "Failed")


class Kubelet:
    """The node agent: informers in, pod workers out."""

    def __init__(
        self, cfg: Config, api: client.ApiClient, pod_cidr: str, claims: AddressClaims
    ) -> None:
        self.config = cfg
        self.core = client.CoreV1Api(api)
        discovery = client.DiscoveryV1Api(api)
        self.node = NodeAgent(api, cfg.node_name, cfg.host_ip)
        self.ips = IpPool(pod_cidr, claims.claim, claims.release)
        self.workers: dict[str, PodWorker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._services: ServiceMap = {}
        self._chores: set[asyncio.Task[None]] = set()
        self.configmaps = Informer(
            "ConfigMap", self.core.list_config_map_for_all_namespaces, self._on_ref
        )
        self.secrets = Informer("Secret", self.core.list_secret_for_all_namespaces, self._on_ref)
        self.slices = Informer(
            "EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces, self._on_slice
        )
        self.pods = Informer(
            "Pod",
            self.core.list_pod_for_all_namespaces,
            self._on_pod,
            field_selector=f"spec.nodeName={cfg.node_name}",
        )

    # -- NodeContext ------------------------------------------------------------------------

    def lookup(self, kind: str, namespace: str, name: str) -> Obj | None:
        store = self.configmaps if kind == "ConfigMap" else self.secrets
        return store.get(namespace, name)

    def services(self) -> ServiceMap:
        return self._services

    def allocate_ip(self, uid: str) -> str:
        return self.ips.allocate(uid)

    def release(self, uid: str) -> None:
        self.ips.release(uid)
        self.workers.pop(uid, None)
        self.tasks.pop(uid, None)

    # -- events -----------------------------------------------------------------------------

    def _on_pod(self, event: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if event == "DELETED":
            if worker is not None:
                worker.gone()
            return
        if worker is not None:
            worker.update(pod)
            return
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if (pod.get("status") or {}).get("phase") in TERMINAL or (
            deleting and not (pod.get("status") or {}).get("containerStatuses")
        ):
            if deleting:  # nothing of it runs here: finish the deletion
                self._chores.add(task := asyncio.create_task(self._delete(pod)))
                task.add_done_callback(self._chores.discard)
            return
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        self.tasks[uid] = asyncio.create_task(worker.run(), name=f"pod {uid}")
        if deleting:
            worker.update(pod)

    async def _delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            await call(
                self.core.delete_namespaced_pod,
                meta["name"],
                meta["namespace"],
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )

    def _on_ref(self, _event: str, obj: Obj) -> None:
        namespace = obj["metadata"].get("namespace")
        for worker in self.workers.values():
            if worker.namespace == namespace:
                worker.config_refs_changed()

    def _on_slice(self, _event: str, _obj: Obj) -> None:
        fresh = service_map(self.slices.store.values())
        if fresh != self._services:
            self._services = fresh
            for worker in self.workers.values():
                worker.hosts_changed()

    # -- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.node.register()
        background = [
            asyncio.create_task(self.node.heartbeat()),
            asyncio.create_task(self.configmaps.run()),
            asyncio.create_task(self.secrets.run()),
            asyncio.create_task(self.slices.run()),
        ]
        for informer in (self.configmaps, self.secrets, self.slices):
            await informer.synced.wait()
        background.append(asyncio.create_task(self.pods.run()))
        log.info("node %s ready", self.config.node_name)
        try:
            await stop.wait()
        finally:
            for worker in list(self.workers.values()):
                worker.shutdown()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubelet", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--node-name", default=NODE_NAME)
    parser.add_argument("--host-ip", default="127.0.0.1", help="the node's InternalIP")
    parser.add_argument("--pod-cidr", default=DEFAULT_POD_CIDR)
    parser.add_argument(
        "--address-claims",
        type=Path,
        default=DEFAULT_CLAIMS_DIR,
        help="directory where every kubelet of the machine locks the pod IPs it hands out",
    )
    parser.add_argument(
        "--project-image",
        action="append",
        help=f"image repository that runs the project's code (default {DEFAULT_PROJECT_IMAGE})",
    )
    parser.add_argument("--python", default=sys.executable, help="the project's interpreter")
    parser.add_argument("--state-dir", required=True, type=Path, help="pod directories")
    parser.add_argument("--log-dir", required=True, type=Path, help="container logs")
    parser.add_argument("--backoff-base", type=float, default=1.0, help="seconds")
    parser.add_argument("--backoff-cap", type=float, default=30.0, help="seconds")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(args.kubeconfig), client_configuration=configuration
    )
    server = urlsplit(configuration.host)
    cfg = Config(
        node_name=args.node_name,
        host_ip=args.host_ip,
        project_images=tuple(args.project_image or [DEFAULT_PROJECT_IMAGE]),
        python=args.python,
        state_dir=args.state_dir,
        log_dir=args.log_dir,
        apiserver_host=str(server.hostname or "127.0.0.1"),
        apiserver_port=server.port or 443,
        host_path=os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        backoff=Backoff(base=args.backoff_base, cap=args.backoff_cap),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    claims = AddressClaims(args.address_claims)
    try:
        async with client.ApiClient(configuration) as api:
            await Kubelet(cfg, api, args.pod_cidr, claims).run(stop)
    finally:
        claims.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    missing = missing_tools()
    if missing:
        print(f"kubelet: missing host tools: {', '.join(missing)} (util-linux)", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("kubelet: must run as root (mount namespaces)", file=sys.stderr)
        return 1
    return asyncio.run(amain(args))
