"""A real, Docker-free Kubernetes control plane for backdial's tests.

The control plane is made of local processes, in the spirit of controller-runtime's envtest
but complete enough to run workloads:

* ``etcd`` (go.etcd.io/etcd/server/v3),
* ``kube-apiserver`` with RBAC, the aggregation layer (front-proxy certificates) and
  service-account token signing,
* ``kube-controller-manager`` (all default controllers, including the HPA controller),
* ``kube-scheduler``,
* ``kwok``, which fakes the kubelets of Node objects annotated ``kwok.x-k8s.io/node=fake``
  and moves their pods to ``Running`` using the stages in ``kwok/stages.yaml``,
* the process kubelet (``kubelet/``, node ``backdial-proc-0``), which really runs the pods
  placed on it (``PROCESS_PLACEMENT``) as local processes with pod IPs in 127.42.0.0/16.

Binaries come from ``build.sh`` (built from the Go module proxy into ``~/.cache/backdial``);
certificates are made with the ``openssl`` CLI. Everything listens on 127.0.0.1 only, on free
ports, and all state lives in one work directory.

Typical use::

    binaries = build()                      # builds what is missing, returns paths
    with Cluster(binaries) as cluster:      # starts and waits until nodes are Ready
        cluster.kubectl("get", "nodes")
        cluster.api.request("GET", "/api/v1/namespaces")

The harness itself uses only the Python standard library and PyYAML; the process kubelet,
a separate process, uses ``kubernetes_asyncio`` (the ``test`` extra).

The pieces live in sibling modules, re-exported here: ``util`` (errors, logging, polling),
``binaries`` (caches and ``build.sh``), ``certs`` (PKI and kubeconfigs), ``apiclient`` (HTTPS
to the API server), ``processes`` (start, liveness, stop, logs) and ``components`` (command
lines and health probes). This module orchestrates them into a :class:`Cluster`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

from apiclient import ApiClient, ApiResponse
from binaries import (
    BUILD_SCRIPT,
    HERE,
    TOOL_NAMES,
    Binaries,
    build,
    cache_root,
    default_state_dir,
    find_go,
    missing_prerequisites,
)
from certs import (
    ADMIN_USER,
    DEFAULT_SERVICE_CIDR,
    DEFAULT_SERVICE_IP,
    PKI,
    CertPair,
    write_kubeconfig,
)
from clients import ClusterClients, find_pod_log, service_account_with_role
from components import (
    KWOK_NODE_ANNOTATION,
    KWOK_NODE_ANNOTATION_VALUE,
    KWOK_STAGES,
    Endpoints,
    apiserver_args,
    apiserver_ready,
    component_healthy,
    controller_manager_args,
    create_node,
    default_service_account,
    etcd_args,
    etcd_healthy,
    kubelet_args,
    kwok_args,
    node_ready,
    scheduler_args,
)
from kubelet import (
    DEFAULT_POD_CIDR as PROCESS_POD_CIDR,
)
from kubelet import (
    DEFAULT_PROJECT_IMAGE,
    FAKE_POD_CIDR,
    IMAGE_NOT_RUNNABLE,
    NODE_KIND_LABEL,
    NODE_KIND_PROCESS,
    NODE_NAME,
    PROCESS_PLACEMENT,
    TAINT_KEY,
    place_on_process_node,
    process_deployment,
)
from processes import Process, _tail, processes_matching, stop_processes
from util import HarnessError, LogFn, ToolchainMissingError, _free_port, _stderr_log, poll

__all__ = [
    "ADMIN_USER",
    "BUILD_SCRIPT",
    "DEFAULT_NODE_NAMES",
    "DEFAULT_POD_CIDR",
    "DEFAULT_PROJECT_IMAGE",
    "DEFAULT_SERVICE_CIDR",
    "DEFAULT_SERVICE_IP",
    "HERE",
    "IMAGE_NOT_RUNNABLE",
    "KWOK_NODE_ANNOTATION",
    "KWOK_NODE_ANNOTATION_VALUE",
    "KWOK_STAGES",
    "NODE_KIND_LABEL",
    "NODE_KIND_PROCESS",
    "PKI",
    "PROCESS_NODE_NAME",
    "PROCESS_PLACEMENT",
    "PROCESS_POD_CIDR",
    "STATE_FILE",
    "TAINT_KEY",
    "TOOL_NAMES",
    "ApiClient",
    "ApiResponse",
    "Binaries",
    "CertPair",
    "Cluster",
    "Endpoints",
    "HarnessError",
    "LogFn",
    "Process",
    "ToolchainMissingError",
    "build",
    "cache_root",
    "default_state_dir",
    "find_go",
    "find_pod_log",
    "missing_prerequisites",
    "place_on_process_node",
    "poll",
    "process_deployment",
    "processes_matching",
    "service_account_with_role",
    "stop_processes",
    "write_kubeconfig",
]

DEFAULT_NODE_NAMES: tuple[str, ...] = ("backdial-kwok-0",)
DEFAULT_POD_CIDR = FAKE_POD_CIDR  # kwok writes pod IPs from here into pod status only
PROCESS_NODE_NAME = NODE_NAME
STATE_FILE = "state.json"
KUBELET = "kubelet"

# The kubelet first (it stops its containers), then the other clients of the API server,
# then the API server, then its storage.
_STOP_ORDER: tuple[tuple[str, ...], ...] = (
    (KUBELET,),
    ("kwok", "kube-scheduler", "kube-controller-manager"),
    ("kube-apiserver",),
    ("etcd",),
)


class Cluster(ClusterClients):
    """A local control plane: etcd, kube-apiserver, controller-manager, scheduler and kwok.

    ``workdir`` (a new temporary directory by default) holds certificates, kubeconfigs, etcd's
    data and the ``logs/`` directory. Use as a context manager, or call :meth:`start` and
    :meth:`stop`. With ``die_with_parent`` (the default) the processes get SIGKILL from the
    kernel if the Python process dies without stopping them; without it they outlive this
    process and ``state_file`` (rewritten after every spawn) lets :meth:`load_state` find
    and stop them later.
    """

    def __init__(
        self,
        binaries: Binaries,
        workdir: Path | None = None,
        *,
        node_names: Sequence[str] = DEFAULT_NODE_NAMES,
        process_node: bool = True,
        project_images: Sequence[str] = (DEFAULT_PROJECT_IMAGE,),
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        service_ip: str = DEFAULT_SERVICE_IP,
        pod_cidr: str = DEFAULT_POD_CIDR,
        process_pod_cidr: str = PROCESS_POD_CIDR,
        hpa_sync_period: str = "3s",
        die_with_parent: bool = True,
        state_file: Path | None = None,
        verbosity: int = 1,
        log: LogFn = _stderr_log,
    ) -> None:
        self.binaries = binaries
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="backdial-k8s-")) if workdir is None else workdir
        )
        self.node_names = tuple(node_names)
        self.process_node = process_node
        self.project_images = tuple(project_images)
        self.service_cidr = service_cidr
        self.service_ip = service_ip
        self.pod_cidr = pod_cidr
        self.process_pod_cidr = process_pod_cidr
        self.hpa_sync_period = hpa_sync_period
        self.die_with_parent = die_with_parent
        self.state_file = state_file
        self.verbosity = verbosity
        self.log = log
        self.pki = PKI(self.workdir / "pki")
        self.logs_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kube_cache_dir = self.workdir / "kube-cache"
        self.processes: dict[str, Process] = {}
        self.endpoints: Endpoints | None = None
        self._api: ApiClient | None = None

    # -- public helpers ------------------------------------------------------------------

    @property
    def all_node_names(self) -> tuple[str, ...]:
        """The kwok nodes, then the process node (if started)."""
        return self.node_names + ((NODE_NAME,) if self.process_node else ())

    @property
    def server(self) -> str:
        """URL of the API server."""
        return f"https://127.0.0.1:{self._endpoints.apiserver}"

    @property
    def api(self) -> ApiClient:
        """HTTPS client authenticated as the cluster admin (group system:masters)."""
        if self._api is None:
            self._api = ApiClient(
                "127.0.0.1", self._endpoints.apiserver, self.pki.ca.cert, self.pki.admin
            )
        return self._api

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def _endpoints(self) -> Endpoints:
        if self.endpoints is None:
            raise HarnessError("the cluster has not been started")
        return self.endpoints

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(keep_logs=exc_type is not None)

    def start(self, timeout: float = 180.0, attempts: int = 2) -> None:
        """Start every component and wait until the API server is ready and nodes are Ready.

        Ports are picked free just before use; if a component still loses one to another
        process ("address already in use"), start-up is retried with new ports, up to
        ``attempts`` times in all. On failure everything started is stopped, the logs are kept
        (see :meth:`stop`) and :class:`HarnessError` names the log directory.
        """
        started = time.monotonic()
        deadline = started + timeout
        for attempt in range(1, attempts + 1):
            try:
                self._start(deadline)
                break
            except BaseException as exc:
                self.terminate(grace=3.0)  # first, so that the logs are complete
                if isinstance(exc, Exception) and attempt < attempts and self._port_clash():
                    first_line = str(exc).partition("\n")[0]
                    self.log(f"a port was taken meanwhile ({first_line}); retrying with new ports")
                    self._reset(attempt)
                    continue
                tails = "\n".join(
                    f"--- {name} (last lines) ---\n{_tail(Path(proc.log), 15)}"
                    for name, proc in self.processes.items()
                )
                kept = self._keep_logs()
                if not isinstance(exc, Exception):  # KeyboardInterrupt and friends
                    raise
                raise HarnessError(
                    f"control plane failed to start: {exc}\nlogs kept in {kept}\n{tails}"
                ) from exc
        self.log(f"control plane ready in {time.monotonic() - started:.1f}s at {self.server}")

    def _port_clash(self) -> bool:
        return any(
            "address already in use" in _tail(Path(proc.log), 200)
            for proc in self.processes.values()
        )

    def _reset(self, attempt: int) -> None:
        """Forget a failed attempt: processes, ports, etcd data; keep its logs aside."""
        self.processes.clear()
        self.endpoints = None
        self._api = None
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        if self.logs_dir.is_dir():
            self.logs_dir.rename(self.workdir / f"logs.attempt{attempt}")

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("start-up deadline exceeded")
        return remaining

    def _start(self, deadline: float) -> None:
        for sub in ("etcd", "run", "home"):
            (self.workdir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.pki.generate(self.service_ip)
        taken: set[int] = set()
        self.endpoints = Endpoints(
            etcd_client=_free_port(taken),
            etcd_peer=_free_port(taken),
            apiserver=_free_port(taken),
            controller_manager=_free_port(taken),
            scheduler=_free_port(taken),
        )
        write_kubeconfig(self.kubeconfig, self.server, self.pki.ca.cert, self.pki.admin)
        run = self.workdir / "run"
        write_kubeconfig(
            run / "controller-manager.kubeconfig",
            self.server,
            self.pki.ca.cert,
            self.pki.controller_manager,
            "system:kube-controller-manager",
        )
        write_kubeconfig(
            run / "scheduler.kubeconfig",
            self.server,
            self.pki.ca.cert,
            self.pki.scheduler,
            "system:kube-scheduler",
        )
        write_kubeconfig(
            run / "kwok.kubeconfig", self.server, self.pki.ca.cert, self.pki.kwok, "backdial-kwok"
        )
        write_kubeconfig(
            run / "kubelet.kubeconfig",
            self.server,
            self.pki.ca.cert,
            self.pki.kubelet,
            "backdial-process-kubelet",
        )

        ep, wd = self._endpoints, self.workdir
        self._spawn("etcd", etcd_args(wd, ep))
        poll(self._etcd_healthy, timeout=min(30.0, self._remaining(deadline)), what="etcd")
        self._spawn(
            "kube-apiserver",
            apiserver_args(wd, ep, self.pki, self.service_cidr, self.verbosity),
        )
        poll(
            self._apiserver_ready,
            timeout=self._remaining(deadline),
            interval=0.25,
            what="kube-apiserver /readyz",
        )
        self._spawn(
            "kube-controller-manager",
            controller_manager_args(
                wd, ep, self.pki, self.service_cidr, self.hpa_sync_period, self.verbosity
            ),
        )
        self._spawn("kube-scheduler", scheduler_args(wd, ep, self.verbosity))
        self._spawn("kwok", kwok_args(wd, self.pod_cidr))
        if self.process_node:
            self._spawn(
                KUBELET,
                kubelet_args(
                    wd, self.logs_dir, NODE_NAME, self.process_pod_cidr, self.project_images
                ),
            )
        for name in self.node_names:
            create_node(self.api, name)
        for name, port in (
            ("kube-controller-manager", self._endpoints.controller_manager),
            ("kube-scheduler", self._endpoints.scheduler),
        ):
            poll(
                functools.partial(self._component_healthy, name, port),
                timeout=self._remaining(deadline),
                what=f"{name} /healthz",
            )
        for name in self.all_node_names:
            poll(
                functools.partial(self._node_ready, name),
                timeout=self._remaining(deadline),
                what=f"node {name} Ready",
            )
        # The service-account controller must have made `default` before pods can be created.
        poll(
            self._default_service_account,
            timeout=self._remaining(deadline),
            what="the default ServiceAccount",
        )

    def stop(self, *, keep_logs: bool = False, grace: float = 10.0) -> Path | None:
        """Stop every process (SIGTERM, then SIGKILL after ``grace`` s).

        With ``keep_logs`` the ``logs/`` directory is kept (moved out of a temporary work
        directory into ``<cache>/logs/``) and its path returned. A work directory this object
        created is removed.
        """
        self.terminate(grace)
        if keep_logs:
            return self._keep_logs()
        self._cleanup()
        return None

    def terminate(self, grace: float = 10.0) -> None:
        """Stop every process but leave the work directory alone."""
        procs = self.processes
        stages = [[procs[n] for n in stage if n in procs] for stage in _STOP_ORDER]
        stop_processes(stages, grace)

    def _keep_logs(self) -> Path | None:
        kept: Path | None = None
        if self.logs_dir.is_dir():
            kept = _keep_logs(self.logs_dir) if self._own_workdir else self.logs_dir
            self.log(f"logs kept in {kept}")
        self._cleanup()
        return kept

    def _cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> dict[str, bool]:
        """Which components are still running."""
        return {name: proc.alive() for name, proc in self.processes.items()}

    # -- state (for `cluster up` / `cluster down`) ---------------------------------------

    def save_state(self, path: Path) -> None:
        """Record what :meth:`load_state` needs to find and stop this cluster later."""
        state = {
            "version": 1,
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "endpoints": asdict(self._endpoints),
            "node_names": list(self.node_names),
            "process_node": self.process_node,
            "project_images": list(self.project_images),
            "binaries": self.binaries.as_tools(),
            "processes": [proc.to_state() for proc in self.processes.values()],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load_state(cls, path: Path, log: LogFn = _stderr_log) -> Cluster:
        """Rebuild a (detached) cluster handle from :meth:`save_state`'s file."""
        state = json.loads(path.read_text())
        cluster = cls(
            Binaries.from_tools(state["binaries"]),
            Path(state["workdir"]),
            node_names=state["node_names"],
            process_node=bool(state.get("process_node", False)),
            project_images=state.get("project_images") or (DEFAULT_PROJECT_IMAGE,),
            die_with_parent=False,
            log=log,
        )
        cluster.endpoints = Endpoints(**state["endpoints"])
        for item in state["processes"]:
            proc = Process(
                item["name"],
                list(item["argv"]),
                item["log"],
                int(item["pid"]),
                int(item["start_time"]),
            )
            cluster.processes[proc.name] = proc
        return cluster

    # -- internals -----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        env = dict(os.environ)
        for var in ("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(var, None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        env["HOME"] = str(self.workdir / "home")  # kwok reads ~/.kwok/kwok.yaml if present
        if name == KUBELET:  # a Python program: args start with the interpreter
            argv = args
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            binary = {
                "etcd": self.binaries.etcd,
                "kube-apiserver": self.binaries.kube_apiserver,
                "kube-controller-manager": self.binaries.kube_controller_manager,
                "kube-scheduler": self.binaries.kube_scheduler,
                "kwok": self.binaries.kwok,
            }[name]
            argv = [str(binary), *args]
        proc = Process(name, argv, str(self.logs_dir / f"{name}.log"))
        proc.start(cwd=self.workdir, env=env, die_with_parent=self.die_with_parent)
        self.processes[name] = proc
        self.log(f"started {name} (pid {proc.pid})")
        if self.state_file is not None:
            # Recorded after every spawn, so `cluster down` can clean up even if start-up
            # is interrupted.
            self.save_state(self.state_file)

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if not proc.alive():
            raise HarnessError(f"{name} exited early:\n{_tail(Path(proc.log))}")

    def _etcd_healthy(self) -> bool | None:
        self._check_alive("etcd")
        return etcd_healthy(self._endpoints.etcd_client)

    def _apiserver_ready(self) -> bool | None:
        self._check_alive("kube-apiserver")
        return apiserver_ready(self.api)

    def _component_healthy(self, name: str, port: int) -> bool | None:
        self._check_alive(name)
        return component_healthy(port)

    def _node_ready(self, name: str) -> bool | None:
        self._check_alive(KUBELET if name == NODE_NAME and self.process_node else "kwok")
        return node_ready(self.api, name)

    def _default_service_account(self) -> bool | None:
        self._check_alive("kube-controller-manager")
        return default_service_account(self.api)


def _keep_logs(logs_dir: Path, keep_last: int = 10) -> Path:
    """Move ``logs_dir`` to ``<cache>/logs/<timestamp>-<pid>``; prune old kept logs."""
    root = Path(os.environ.get("BACKDIAL_K8S_LOG_DIR") or cache_root() / "logs")
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    shutil.move(str(logs_dir), target)
    kept = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target
