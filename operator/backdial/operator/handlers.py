"""The kopf shell: thin handlers that feed the pure reconcile core and write status.

* Two kopf *indexes* hold the pods (server-side label selector ``backdial.dev/injected``
  unless ``--all-pods``) and the SessionSlices, by namespace.  kopf runs no other handler
  before both are fully listed, so no plan is ever made from a partial view.
* Every pod or SessionSlice event only marks its namespace changed (``Hub.touch``).
* One *worker* task per SessionSlice (started by its first event, so never before the
  indexes are complete; not a kopf daemon, which would need a finalizer) recomputes its
  plan when its namespace changed (bursts coalesce into one recompute), publishes per-pod
  configs to the hub (streams deliver them), and writes the status at most once per
  second, only when it changed.  Events are posted when a conflict with another
  SessionSlice appears or a spec turns invalid.
  A deleted SessionSlice's pods are told to go back to their local config.

No handler writes to pods and nothing writes per pod: a spec change costs one status
patch per SessionSlice, whatever the number of pods.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from backdial.operator import models
from backdial.operator.fleet import Fleet, slice_status, stamp_conditions
from backdial.operator.hub import Hub
from backdial.operator.kube import Kube, KubeError, in_cluster_info
from backdial.operator.reconcile import Plan, PodInfo, SliceInfo, plan
from backdial.operator.scaling import kube_request, sync_hpa

log = logging.getLogger("backdial.operator")
DEBOUNCE = 0.05  # seconds: pod events arriving together become one recompute
STATUS_INTERVAL = 1.0  # at most one status write per SessionSlice per second


@dataclass(slots=True)
class Shared:
    """What the handlers share with the rest of the process (kopf's ``memo``)."""

    hub: Hub
    fleet: Fleet
    kube: Kube
    plans: dict[str, Plan] = field(default_factory=dict)  # SessionSlice key -> latest plan
    workers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    status_writes: int = 0
    events_posted: int = 0
    recomputes: int = 0  # plans made (each after a burst of changes)

    def start_worker(
        self,
        namespace: str,
        name: str,
        pods: kopf.Index[str, PodInfo],
        slices: kopf.Index[str, SliceInfo],
    ) -> None:
        key = f"{namespace}/{name}"
        task = self.workers.get(key)
        if task is None or task.done():
            worker = SliceWorker(self, namespace, name)
            self.workers[key] = asyncio.ensure_future(worker.run(pods, slices))

    def stop_worker(self, namespace: str, name: str, revert: bool) -> None:
        """The SessionSlice is gone: its pods go back to their local config (*revert*)."""
        key = f"{namespace}/{name}"
        task = self.workers.pop(key, None)
        if task is not None:
            task.cancel()
        self.hub.release(key, revert=revert)

    def stop_all(self) -> None:
        for task in self.workers.values():
            task.cancel()
        self.workers.clear()


def pod_info(
    namespace: str, name: str, meta: Mapping[str, Any], status: Mapping[str, Any]
) -> PodInfo:
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid", "")),
        labels=dict(meta.get("labels") or {}),
        ready=ready and status.get("phase") == "Running",
        terminating=bool(meta.get("deletionTimestamp")),
        ip=str(status.get("podIP") or ""),
    )


def slice_info(
    namespace: str, name: str, meta: Mapping[str, Any], spec: Mapping[str, Any]
) -> SliceInfo:
    return SliceInfo(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 1),
        created=str(meta.get("creationTimestamp") or ""),
        spec=_plain(spec),
    )


def _plain(value: Any) -> Any:
    """A deep copy of kopf's body views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def make_registry(pod_selector: str | None, peering_lifetime: int = 60) -> kopf.OperatorRegistry:
    """All handlers, on a registry of their own (tests run several operators)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In-cluster ServiceAccount first, else $KUBECONFIG: the same as kube.Kube.
        return in_cluster_info() or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # no kopf progress Events: we post our own few
        settings.watching.server_timeout = 300
        # Resources are discovered once at start-up (install the CRDs first); watching
        # CustomResourceDefinitions for later ones would need cluster-wide RBAC on them.
        settings.scanning.disabled = True
        settings.peering.lifetime = peering_lifetime
        if pod_selector:
            settings.watching.label_selectors["v1", "pods"] = pod_selector

    @kopf.index("v1", "pods", registry=registry, id="backdial_pods")
    async def backdial_pods(
        *, namespace: str | None, name: str, meta: kopf.Meta, status: kopf.Status, **_: Any
    ) -> dict[str, PodInfo]:
        ns = namespace or ""
        return {ns: pod_info(ns, name, meta, status)}

    @kopf.index(
        models.GROUP, models.VERSION, models.PLURAL, registry=registry, id="backdial_slices"
    )
    async def backdial_slices(
        *, namespace: str | None, name: str, meta: kopf.Meta, spec: kopf.Spec, **_: Any
    ) -> dict[str, SliceInfo]:
        ns = namespace or ""
        return {ns: slice_info(ns, name, meta, spec)}

    @kopf.on.event("v1", "pods", registry=registry)
    async def _pod_event(*, namespace: str | None, memo: Any, **_: Any) -> None:
        memo["shared"].hub.touch(namespace or "")

    @kopf.on.event(models.GROUP, models.VERSION, models.PLURAL, registry=registry)
    async def _slice_event(
        *,
        event: kopf.RawEvent,
        namespace: str | None,
        name: str,
        memo: Any,
        **kwargs: Any,
    ) -> None:
        namespace = namespace or ""
        pods: kopf.Index[str, PodInfo] = kwargs["backdial_pods"]
        slices: kopf.Index[str, SliceInfo] = kwargs["backdial_slices"]
        shared: Shared = memo["shared"]
        shared.hub.touch(namespace)
        if event.get("type") == "DELETED":
            shared.stop_worker(namespace, name, revert=True)
        else:
            shared.start_worker(namespace, name, pods, slices)

    return registry


class SliceWorker:
    """One SessionSlice's loop: plan on change, publish, write status."""

    def __init__(self, shared: Shared, namespace: str, name: str) -> None:
        self.shared, self.namespace, self.name = shared, namespace, name
        self.key = f"{namespace}/{name}"
        self.written: dict[str, Any] | None = None  # last status written (no timestamps)
        self.conditions: list[dict[str, Any]] = []
        self.written_at = float("-inf")
        self.reported: tuple[list[str], str] = ([], "")  # conflicts, error already announced
        self.hpa_synced: tuple[str, int] = ("", 0)  # (uid, generation) the HPA matches

    async def run(self, pods: kopf.Index[str, PodInfo], slices: kopf.Index[str, SliceInfo]) -> None:
        hub = self.shared.hub
        spec_changed, figures_changed = hub.subscribe(self.namespace)
        loop = asyncio.get_running_loop()
        current: Plan | None = None
        try:
            while True:
                waits = {
                    asyncio.ensure_future(spec_changed.wait()),
                    asyncio.ensure_future(figures_changed.wait()),
                }
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                if spec_changed.is_set():
                    await asyncio.sleep(DEBOUNCE)
                    spec_changed.clear()
                    info = _find(slices, self.namespace, self.name)
                    if info is None:
                        continue  # deleted: the DELETED event stops this worker
                    current = plan(
                        info, _store(pods, self.namespace), _store(slices, self.namespace)
                    )
                    self.shared.plans[self.key] = current
                    self.shared.recomputes += 1
                    hub.publish(current)
                    await self._announce(current)
                    await self._sync_hpa(current)
                figures_changed.clear()
                if current is not None:
                    wait = self.written_at + STATUS_INTERVAL - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self._write_status(current)
        finally:
            hub.unsubscribe(self.namespace, (spec_changed, figures_changed))
            self.shared.plans.pop(self.key, None)

    async def _sync_hpa(self, current: Plan) -> None:
        """The HPA follows ``spec.autoscaling`` (once per generation; docs/autoscaling.md)."""
        info = current.slice
        if not current.valid or self.hpa_synced == (info.uid, info.generation):
            return
        try:
            await sync_hpa(
                kube_request(self.shared.kube),
                info.namespace,
                info.name,
                info.uid,
                models.API_VERSION,
                info.spec.get("autoscaling"),
            )
        except KubeError as exc:
            log.warning("HPA of %s not synced: %s", self.key, exc)
            return
        self.hpa_synced = (info.uid, info.generation)

    async def _write_status(self, current: Plan) -> None:
        status = slice_status(current, self.shared.fleet)
        if status == self.written:
            return
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = stamp_conditions(status["conditions"], self.conditions, now)
        body = {"status": {**status, "conditions": conditions}}
        path = (
            f"/apis/{models.GROUP}/{models.VERSION}/namespaces/{self.namespace}/"
            f"{models.PLURAL}/{self.name}/status"
        )
        try:
            await self.shared.kube.request(
                "PATCH", path, body, content_type="application/merge-patch+json"
            )
        except KubeError as exc:
            if exc.status != 404:  # 404: deleted meanwhile
                log.warning("status of %s not written: %s", self.key, exc)
            return
        self.shared.status_writes += 1
        self.written, self.conditions = status, conditions
        self.written_at = asyncio.get_running_loop().time()

    async def _announce(self, current: Plan) -> None:
        """One Event when a conflict appears or changes, and when a spec turns invalid."""
        conflicts, error = current.conflicts, current.error
        if (conflicts, error) == self.reported:
            return
        old_conflicts, old_error = self.reported
        self.reported = (conflicts, error)
        if conflicts and conflicts != old_conflicts:
            await self._event(
                "Conflict",
                "pods are also selected by SessionSlice "
                + ", ".join(conflicts)
                + "; the oldest one configures them",
                current.slice,
            )
        if error and error != old_error:
            await self._event("InvalidSpec", error, current.slice)

    async def _event(self, reason: str, message: str, info: SliceInfo) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": models.API_VERSION,
                "kind": models.KIND,
                "name": self.name,
                "namespace": self.namespace,
                "uid": info.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": "backdial-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.shared.kube.request(
                "POST", f"/api/v1/namespaces/{self.namespace}/events", body, ok=(201,)
            )
            self.shared.events_posted += 1
        except KubeError as exc:
            log.warning("event %s on %s not posted: %s", reason, self.key, exc)


def _store(index: kopf.Index[str, Any], namespace: str) -> Iterable[Any]:
    return list(index[namespace]) if namespace in index else []


def _find(index: kopf.Index[str, SliceInfo], namespace: str, name: str) -> SliceInfo | None:
    for info in _store(index, namespace):
        if info.name == name:
            found: SliceInfo = info
            return found
    return None
