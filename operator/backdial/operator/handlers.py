"""The kopf shell: thin handlers that feed the pure reconcile core and write status.

* Three kopf *indexes* hold the pods (server-side label selector ``backdial.dev/injected``
  unless ``--all-pods``), the SessionSlices and the HorizontalPodAutoscalers, by namespace.
  kopf runs no other handler before all are fully listed, so no plan is ever made from a
  partial view.
* Every pod or SessionSlice event only marks its namespace changed (``Hub.touch``); an HPA
  event only wakes the namespace's workers to look at their HPA (``Hub.hpas_changed``), so
  an HPA deleted by hand comes back at once and the ``ScalingActive`` condition follows
  what the HPA controller reports, without recomputing any pod's config.
* One *worker* task per SessionSlice (started by its first event, so never before the
  indexes are complete; not a kopf daemon, which would need a finalizer) recomputes its
  plan when its namespace changed (bursts coalesce into one recompute), publishes per-pod
  configs to the hub (streams deliver them), and writes the status at most once per
  second, only when it changed.  Events are posted when a conflict with another
  SessionSlice or with an HPA it does not own appears, or a spec turns invalid.
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

from backdial.operator import hpa, models
from backdial.operator.fleet import Fleet, slice_status, stamp_conditions
from backdial.operator.hub import Hub
from backdial.operator.kube import Kube, KubeError, in_cluster_info
from backdial.operator.reconcile import Plan, PodInfo, SliceInfo, plan
from backdial.operator.scaling import apply_hpa, kube_request

log = logging.getLogger("backdial.operator")
DEBOUNCE = 0.05  # seconds: pod events arriving together become one recompute
STATUS_INTERVAL = 1.0  # at most one status write per SessionSlice per second
MAX_HPA_UPDATES = 5  # replacements in a row that did not converge: stop, log (no write loop)
HPA_RETRY = 5.0  # seconds before an HPA write the API server refused is tried again
HPA = ("autoscaling", "v2", "horizontalpodautoscalers")


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

    def start_worker(self, namespace: str, name: str, indexes: Indexes) -> None:
        key = f"{namespace}/{name}"
        task = self.workers.get(key)
        if task is None or task.done():
            worker = SliceWorker(self, namespace, name)
            self.workers[key] = asyncio.ensure_future(worker.run(indexes))

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


def hpa_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of an HPA: identity, owners, spec and the controller's status."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return {
        "metadata": _plain(
            {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion")}
            | {"labels": meta.get("labels") or {}}
            | {"ownerReferences": meta.get("ownerReferences") or []}
        ),
        "spec": _plain(body.get("spec") or {}),
        "status": _plain(
            {k: status.get(k) for k in ("currentReplicas", "desiredReplicas")}
            | {"conditions": status.get("conditions") or []}
        ),
    }


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

    @kopf.index(*HPA, registry=registry, id="backdial_hpas")
    async def backdial_hpas(
        *, namespace: str | None, body: kopf.Body, **_: Any
    ) -> dict[str, dict[str, Any]]:
        return {namespace or "": hpa_view(body)}

    @kopf.on.event("v1", "pods", registry=registry)
    async def _pod_event(*, namespace: str | None, memo: Any, **_: Any) -> None:
        memo["shared"].hub.touch(namespace or "")

    @kopf.on.event(*HPA, registry=registry)
    async def _hpa_event(*, namespace: str | None, memo: Any, **_: Any) -> None:
        memo["shared"].hub.hpas_changed(namespace or "")

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
        indexes = Indexes(
            kwargs["backdial_pods"], kwargs["backdial_slices"], kwargs["backdial_hpas"]
        )
        shared: Shared = memo["shared"]
        shared.hub.touch(namespace)
        if event.get("type") == "DELETED":
            shared.stop_worker(namespace, name, revert=True)
        else:
            shared.start_worker(namespace, name, indexes)

    return registry


@dataclass(frozen=True, slots=True)
class Indexes:
    """kopf's indexes, by namespace: pods, SessionSlices, HPAs (``hpa_view``)."""

    pods: kopf.Index[str, PodInfo]
    slices: kopf.Index[str, SliceInfo]
    hpas: kopf.Index[str, dict[str, Any]]


class SliceWorker:
    """One SessionSlice's loop: plan on change, publish, keep its HPA, write status."""

    def __init__(self, shared: Shared, namespace: str, name: str) -> None:
        self.shared, self.namespace, self.name = shared, namespace, name
        self.key = f"{namespace}/{name}"
        self.written: dict[str, Any] | None = None  # last status written (no timestamps)
        self.conditions: list[dict[str, Any]] = []
        self.written_at = float("-inf")
        self.reported: tuple[list[str], str] = ([], "")  # conflicts, error already announced
        self.scaling: dict[str, str] | None = None  # the ScalingActive condition
        self.hpa_conflicts: tuple[str, ...] = ()  # already announced
        self.hpa_updates = (0, 0)  # (generation, replacements in a row without converging)

    async def run(self, indexes: Indexes) -> None:
        hub = self.shared.hub
        events = hub.subscribe(self.namespace)
        spec_changed, figures_changed, hpas_changed = events
        loop = asyncio.get_running_loop()
        current: Plan | None = None
        try:
            while True:
                waits = {asyncio.ensure_future(e.wait()) for e in events}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                if spec_changed.is_set():
                    await asyncio.sleep(DEBOUNCE)
                    spec_changed.clear()
                    info = _find(indexes.slices, self.namespace, self.name)
                    if info is None:
                        continue  # deleted: the DELETED event stops this worker
                    current = plan(
                        info,
                        _store(indexes.pods, self.namespace),
                        _store(indexes.slices, self.namespace),
                    )
                    self.shared.plans[self.key] = current
                    self.shared.recomputes += 1
                    hub.publish(current)
                    await self._announce(current)
                    hpas_changed.set()
                figures_changed.clear()
                if hpas_changed.is_set() and current is not None:
                    hpas_changed.clear()
                    await self._sync_hpa(current, _store(indexes.hpas, self.namespace))
                if current is not None:
                    wait = self.written_at + STATUS_INTERVAL - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self._write_status(current)
        finally:
            hub.unsubscribe(self.namespace, events)
            self.shared.plans.pop(self.key, None)

    async def _sync_hpa(self, current: Plan, live: Iterable[Mapping[str, Any]]) -> None:
        """The HPA follows ``spec.autoscaling`` and comes back when deleted; its state (as
        the HPA controller reports it) becomes ``ScalingActive`` (docs/autoscaling.md)."""
        info = current.slice
        if not current.valid:
            return  # the HPA stays as it is until the spec is valid again
        desired = hpa.desired_hpa(
            info.namespace, info.name, info.uid, models.API_VERSION, info.spec.get("autoscaling")
        )
        decision = hpa.decide(desired, live, info.uid)
        self.scaling = hpa.scaling_condition(decision, desired)
        if decision.conflicts != self.hpa_conflicts:
            self.hpa_conflicts = decision.conflicts
            if decision.conflicts:
                await self._event("HPAConflict", self.scaling["message"], info)
        generation, updates = self.hpa_updates
        updates = updates if generation == info.generation else 0
        if decision.action is hpa.HpaAction.UPDATE:
            if updates >= MAX_HPA_UPDATES:
                return  # logged once below; a spec change starts over
            updates += 1
            if updates == MAX_HPA_UPDATES:
                log.warning("HPA of %s: its spec does not converge; not replaced again", self.key)
        elif decision.action is hpa.HpaAction.NONE:
            updates = 0
        self.hpa_updates = (info.generation, updates)
        try:
            await apply_hpa(kube_request(self.shared.kube), decision, desired)
        except KubeError as exc:
            log.warning("HPA of %s not synced: %s; retrying", self.key, exc)
            asyncio.get_running_loop().call_later(
                HPA_RETRY, self.shared.hub.hpas_changed, self.namespace
            )

    async def _write_status(self, current: Plan) -> None:
        status = slice_status(current, self.shared.fleet, self.scaling)
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
