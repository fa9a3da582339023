"""One pod's life on the process node: sandbox, init containers, sidecars, apps, deletion.

The sandbox is a pod IP from the node's range, a pod directory holding the volumes and
the pod's ``/etc/hosts``, and the file-backed volumes written (tokens requested). Then
regular init containers run to completion in order, native sidecars start in order
(each counts once started), and the app containers start together. Deleting the pod stops
the app containers (``preStop``, SIGTERM, grace period, SIGKILL), then the sidecars in
reverse order, and removes the pod object. Status is written whenever a record changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kubernetes_asyncio import client

from . import IMAGE_NOT_RUNNABLE, POD_LOGS
from .containers import ContainerRunner
from .hosts import ServiceMap, render_hosts
from .informer import ApiError, call
from .plan import (
    ConfigError,
    ContainerKind,
    ContainerPlan,
    Obj,
    PodContext,
    pod_containers,
    resolve_argv,
    resolve_env,
)
from .policy import Backoff
from .process import BindMount, LaunchSpec
from .status import ContainerRecord, PodFacts, State, pod_status
from .tokens import IssuedToken, request_token
from .volumes import (
    TokenSource,
    VolumeContext,
    VolumeType,
    token_sources,
    volume_files,
    write_atomic,
)
from .volumes import volume_type as kind_of_volume

log = logging.getLogger("kubelet.pod")

SHUTDOWN_GRACE = 1.0  # when the kubelet itself stops: no preStop, a short SIGTERM grace


@dataclass(frozen=True)
class Config:
    """The kubelet's settings that pods depend on."""

    node_name: str
    host_ip: str
    project_images: Sequence[str]
    python: str
    state_dir: Path
    log_dir: Path
    apiserver_host: str
    apiserver_port: int
    host_path: str
    backoff: Backoff = field(default_factory=Backoff)


class NodeContext(Protocol):
    """What a pod worker needs from its kubelet."""

    config: Config
    core: client.CoreV1Api

    def lookup(self, kind: str, namespace: str, name: str) -> Obj | None: ...
    def services(self) -> ServiceMap: ...
    def allocate_ip(self, uid: str) -> str: ...
    def release(self, uid: str) -> None: ...


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _make_directory_volume(volume: Obj, path: Path) -> None:
    """An emptyDir is a fresh pod directory; a hostPath of type DirectoryOrCreate is made."""
    if "emptyDir" in volume:
        path.mkdir(parents=True, exist_ok=True)
    elif (volume["hostPath"].get("type") or "") == "DirectoryOrCreate":
        Path(volume["hostPath"]["path"]).mkdir(parents=True, exist_ok=True)


def _newer(candidate: Obj, current: Obj) -> bool:
    """Whether ``candidate`` is a later version of the object than ``current`` (etcd's
    resource versions increase; anything unparsable counts as newer)."""
    try:
        return int(candidate["metadata"]["resourceVersion"]) > int(
            current["metadata"]["resourceVersion"]
        )
    except (KeyError, ValueError):
        return True


def _comparable(status: Obj) -> Obj:
    """``status`` without condition timestamps (they never justify a write)."""
    conditions = [
        {k: v for k, v in c.items() if k not in ("lastTransitionTime", "lastProbeTime")}
        for c in status.get("conditions") or []
    ]
    return {**status, "conditions": conditions}


class PodWorker:
    """Runs one pod; :meth:`run` returns once the pod object is gone."""

    def __init__(self, node: NodeContext, pod: Obj) -> None:
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        cfg = node.config
        self.python = cfg.python
        self.backoff = cfg.backoff
        self.plans = pod_containers(pod, cfg.project_images)
        self.records = {p.name: ContainerRecord(p.name, p.kind, p.image) for p in self.plans}
        self.runners: dict[str, ContainerRunner] = {}
        self.pod_ip = ""
        self.start_time = _now()
        self.sandbox_ready = False
        self.dir: Path = cfg.state_dir / "pods" / self.uid
        self.log_dir: Path = cfg.log_dir / POD_LOGS / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.tokens: dict[TokenSource, IssuedToken] = {}
        self._deleting = asyncio.Event()
        self._gone = False
        self._shutdown = False
        self._dirty = asyncio.Event()
        self._config = asyncio.Event()
        self._volumes_dirty = asyncio.Event()
        self._last_status: Obj | None = None

    # -- PodHost (for the runners) ----------------------------------------------------------

    @property
    def restart_policy(self) -> str:
        return str((self.pod.get("spec") or {}).get("restartPolicy") or "Always")

    @property
    def termination_grace(self) -> float:
        value = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds")
        return float(30 if value is None else value)

    def now(self) -> str:
        return _now()

    def changed(self) -> None:
        self._dirty.set()

    async def config_changed(self, limit: float) -> None:
        self._config.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._config.wait(), limit)

    def paths(self, plan: ContainerPlan) -> tuple[Path, Path]:
        return self.dir / "specs" / f"{plan.name}.json", self.log_dir / f"{plan.name}.log"

    def launch_spec(self, plan: ContainerPlan) -> LaunchSpec:
        cfg = self.node.config
        ctx = PodContext(
            pod=self.pod,
            pod_ip=self.pod_ip,
            host_ip=cfg.host_ip,
            base_env={
                "PATH": cfg.host_path,
                "HOSTNAME": self.name,
                "HOME": str(self.dir / "home"),
            },
            service_env={
                "KUBERNETES_SERVICE_HOST": cfg.apiserver_host,
                "KUBERNETES_SERVICE_PORT": str(cfg.apiserver_port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(cfg.apiserver_port),
                "KUBERNETES_PORT": f"tcp://{cfg.apiserver_host}:{cfg.apiserver_port}",
            },
        )
        env = resolve_env(plan, ctx, self.node.lookup)
        mounts = [BindMount(str(self.dir / "hosts"), "/etc/hosts")]
        for mount in sorted(plan.mounts, key=lambda m: m.path.rstrip("/").count("/")):
            source = self._volume_path(mount.volume)
            if mount.sub_path:
                source = source / mount.sub_path
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append(BindMount(str(source), mount.path, mount.read_only))
        return LaunchSpec(
            argv=resolve_argv(plan, env, self.pod_ip, self.python),
            env=env,
            cwd=str(plan.spec.get("workingDir") or "/"),
            hostname=self.name,
            mounts=mounts,
        )

    # -- events from the kubelet ------------------------------------------------------------

    def update(self, pod: Obj) -> None:
        """A newer version of the pod object arrived."""
        if _newer(pod, self.pod):
            self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self._deleting.set()
        self.config_refs_changed()  # labels/annotations may feed downward-API volumes

    def gone(self) -> None:
        """The pod object was removed (e.g. force-deleted): kill everything now."""
        self._gone = True
        self._deleting.set()

    def shutdown(self) -> None:
        """The kubelet stops: stop the containers quickly, leave the pod object alone."""
        self._shutdown = True
        self._deleting.set()

    def config_refs_changed(self) -> None:
        """A ConfigMap or Secret changed: volumes may need rewriting, waits may end."""
        self._config.set()
        self._volumes_dirty.set()

    def hosts_changed(self) -> None:
        if self.sandbox_ready:
            self._write_hosts()

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        status_writer = asyncio.create_task(self._status_loop())
        life = asyncio.create_task(self._lifecycle())
        self.changed()
        try:
            await self._deleting.wait()
            life.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await life
            await self._terminate()
            if not self._shutdown and not self._gone:
                await self._flush_status()
                await self._delete_object()
        finally:
            status_writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status_writer
            self.node.release(self.uid)
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _lifecycle(self) -> None:
        foreign = [p for p in self.plans if not p.runnable]
        if foreign:
            for plan in self.plans:
                record = self.records[plan.name]
                if plan.runnable:
                    record.wait("ContainerCreating", "another container's image cannot run")
                else:
                    record.wait(
                        IMAGE_NOT_RUNNABLE,
                        f"image {plan.image!r} cannot run on the process node "
                        f"(only {', '.join(self.node.config.project_images)} can)",
                    )
            self.changed()
            return
        has_init = any(p.kind is not ContainerKind.APP for p in self.plans)
        for plan in self.plans:
            app_waits = plan.kind is ContainerKind.APP and has_init
            reason = "PodInitializing" if app_waits else "ContainerCreating"
            self.records[plan.name].wait(reason)
        self.pod_ip = self.node.allocate_ip(self.uid)
        await self._prepare_sandbox()
        refresher = asyncio.create_task(self._refresh_volumes())
        try:
            await self._run_containers()
            await asyncio.Event().wait()  # keep refreshing volumes until deletion
        finally:
            refresher.cancel()

    async def _run_containers(self) -> None:
        for plan in self.plans:
            if plan.kind is ContainerKind.APP:
                continue
            runner = self._start(plan)
            if plan.kind is ContainerKind.SIDECAR:
                await runner.started.wait()
                continue
            await runner.finished.wait()
            record = self.records[plan.name]
            if record.terminated is None or record.terminated.exit_code != 0:
                # restartPolicy Never: the pod failed; its sidecars stop.
                await self._stop_sidecars(time.monotonic() + self.termination_grace, pre_stop=True)
                return
        apps = [self._start(p) for p in self.plans if p.kind is ContainerKind.APP]
        await asyncio.gather(*(r.finished.wait() for r in apps))
        await self._stop_sidecars(time.monotonic() + self.termination_grace, pre_stop=True)

    def _start(self, plan: ContainerPlan) -> ContainerRunner:
        runner = ContainerRunner(self, plan, self.records[plan.name])
        self.runners[plan.name] = runner
        runner.start()
        return runner

    async def _stop_sidecars(self, deadline: float, *, pre_stop: bool) -> None:
        for plan in reversed(self.plans):
            runner = self.runners.get(plan.name)
            if plan.kind is ContainerKind.SIDECAR and runner is not None:
                await runner.stop(max(deadline, time.monotonic() + 2.0), pre_stop=pre_stop)

    async def _terminate(self) -> None:
        """Stop apps (and a running init container) together, then sidecars in reverse."""
        if self._gone:
            grace, pre_stop = 0.0, False
        elif self._shutdown:
            grace, pre_stop = SHUTDOWN_GRACE, False
        else:
            meta_grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
            grace = float(self.termination_grace if meta_grace is None else meta_grace)
            pre_stop = True
        deadline = time.monotonic() + grace
        first = [
            r.stop(deadline, pre_stop=pre_stop)
            for name, r in self.runners.items()
            if self.records[name].kind is not ContainerKind.SIDECAR
        ]
        await asyncio.gather(*first)
        await self._stop_sidecars(deadline, pre_stop=pre_stop)

    async def _delete_object(self) -> None:
        try:
            await call(
                self.node.core.delete_namespaced_pod,
                self.name,
                self.namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("%s/%s: delete failed: %s", self.namespace, self.name, exc)

    # -- sandbox and volumes ----------------------------------------------------------------

    def _volume_path(self, name: str) -> Path:
        volume: Obj
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            if volume["name"] == name:
                if kind_of_volume(volume) is VolumeType.HOST_PATH:
                    return Path(str(volume["hostPath"]["path"]))
                return self.dir / "volumes" / name
        raise ConfigError(f"volume {name!r} is not defined in the pod")

    def _write_hosts(self) -> None:
        text = render_hosts(
            pod_name=self.name,
            pod_namespace=self.namespace,
            pod_ip=self.pod_ip,
            apiserver_ip=self.node.config.apiserver_host,
            services=self.node.services(),
        )
        path = self.dir / "hosts"
        if path.exists() and path.read_text() == text:
            return
        # In place: the file is bind-mounted, a rename would not reach the containers.
        with open(path, "a+") as handle:
            handle.seek(0)
            handle.truncate()
            handle.write(text)

    async def _prepare_sandbox(self) -> None:
        for sub in ("volumes", "specs", "home"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        while True:
            try:
                await self._write_volumes()
                break
            except (ConfigError, ApiError) as exc:
                for record in self.records.values():
                    if record.state is State.WAITING:
                        record.waiting_message = f"volumes not ready: {exc}"
                self.changed()
                await self.config_changed(limit=2.0)
        for record in self.records.values():
            record.waiting_message = ""
        self.sandbox_ready = True
        self.changed()

    async def _write_volumes(self) -> None:
        cfg = self.node.config
        wall = time.time()
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            kind = kind_of_volume(volume)
            path = self.dir / "volumes" / volume["name"]
            if kind in (VolumeType.EMPTY_DIR, VolumeType.HOST_PATH):
                _make_directory_volume(volume, path)
                continue
            for source in token_sources(volume):
                issued = self.tokens.get(source)
                if issued is None or issued.refresh_at <= wall:
                    self.tokens[source] = await request_token(
                        self.node.core, self.pod, source, wall
                    )
            ctx = VolumeContext(
                pod=self.pod,
                pod_ip=self.pod_ip,
                host_ip=cfg.host_ip,
                lookup=self.node.lookup,
                tokens={s: t.token for s, t in self.tokens.items()},
            )
            files = volume_files(volume, ctx)
            if files is not None:
                write_atomic(path, files)

    async def _refresh_volumes(self) -> None:
        """Rewrite volumes when referenced objects change or a token is due."""
        while True:
            due = min((t.refresh_at for t in self.tokens.values()), default=time.time() + 3600)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._volumes_dirty.wait(), max(1.0, due - time.time()))
            self._volumes_dirty.clear()
            try:
                await self._write_volumes()
            except (ConfigError, ApiError) as exc:
                log.warning("%s/%s: volume refresh: %s", self.namespace, self.name, exc)

    # -- status -----------------------------------------------------------------------------

    def _status(self) -> Obj:
        facts = PodFacts(
            pod_ip=self.pod_ip,
            host_ip=self.node.config.host_ip,
            start_time=self.start_time,
            sandbox_ready=self.sandbox_ready,
        )
        records = [self.records[p.name] for p in self.plans]
        return pod_status(self.pod, records, facts, _now())

    async def _flush_status(self) -> None:
        status = self._status()
        if self._last_status is not None and _comparable(status) == self._last_status:
            return
        body = await call(
            self.node.core.patch_namespaced_pod_status,
            self.name,
            self.namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )
        self._last_status = _comparable(status)
        # The watch may already have delivered a newer version (e.g. the deletion).
        if body.get("metadata", {}).get("uid") == self.uid and _newer(body, self.pod):
            self.pod = body

    async def _status_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._flush_status()
            except ApiError as exc:
                if exc.status == 404:
                    return
                log.warning("%s/%s: status update failed: %s", self.namespace, self.name, exc)
                await asyncio.sleep(1.0)
                self._dirty.set()
            except Exception as exc:  # transient connection trouble: try again
                log.warning("%s/%s: status update failed: %s", self.namespace, self.name, exc)
                await asyncio.sleep(1.0)
                self._dirty.set()
