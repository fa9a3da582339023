"""Container and pod status as the API shows them, computed from plain runtime records.

:class:`ContainerRecord` is the kubelet's view of one container; :func:`pod_status` turns
the records of a pod into the ``status`` the API server stores: ``containerStatuses``,
``initContainerStatuses``, the ``phase`` and the conditions ``PodReadyToStartContainers``,
``Initialized``, ``ContainersReady`` and ``Ready`` (plus readiness gates), keeping each
condition's ``lastTransitionTime`` while its status does not change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .plan import ContainerKind, Obj


class State(enum.Enum):
    """A container's state."""

    WAITING = "waiting"
    RUNNING = "running"
    TERMINATED = "terminated"


class Phase(enum.Enum):
    """A pod's phase."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass
class Terminated:
    """How one run of a container ended."""

    exit_code: int
    started_at: str
    finished_at: str
    container_id: str
    signal: int = 0

    @property
    def reason(self) -> str:
        return "Completed" if self.exit_code == 0 else "Error"

    def to_json(self) -> Obj:
        out: Obj = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.signal:
            out["signal"] = self.signal
        return out


@dataclass
class ContainerRecord:
    """The kubelet's view of one container."""

    name: str
    kind: ContainerKind
    image: str
    state: State = State.WAITING
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    started_at: str = ""
    container_id: str = ""
    terminated: Terminated | None = None
    last_terminated: Terminated | None = None
    restart_count: int = 0
    started: bool = False
    ready: bool = False

    def wait(self, reason: str, message: str = "") -> None:
        """Move to Waiting with ``reason`` (keeping the last termination)."""
        if self.state is State.TERMINATED and self.terminated is not None:
            self.last_terminated = self.terminated
        self.state, self.waiting_reason, self.waiting_message = State.WAITING, reason, message
        self.terminated = None
        self.started = self.ready = False

    def run(self, container_id: str, now: str) -> None:
        """Move to Running (a new run of the container)."""
        if self.terminated is not None:
            self.last_terminated = self.terminated
        self.state, self.container_id, self.started_at = State.RUNNING, container_id, now
        self.terminated = None
        self.started = self.ready = False

    def terminate(self, exit_code: int, signal: int, now: str) -> None:
        """Move to Terminated."""
        self.terminated = Terminated(exit_code, self.started_at, now, self.container_id, signal)
        self.state = State.TERMINATED
        self.started = self.ready = False

    def to_json(self) -> Obj:
        """One entry of ``containerStatuses``/``initContainerStatuses``."""
        state: Obj
        if self.state is State.RUNNING:
            state = {"running": {"startedAt": self.started_at}}
        elif self.state is State.TERMINATED and self.terminated is not None:
            state = {"terminated": self.terminated.to_json()}
        else:
            waiting: Obj = {"reason": self.waiting_reason}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            state = {"waiting": waiting}
        out: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "state": state,
            "lastState": (
                {"terminated": self.last_terminated.to_json()} if self.last_terminated else {}
            ),
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started,
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


def pod_phase(records: Sequence[ContainerRecord], restart_policy: str) -> Phase:
    """The pod phase from its containers, as the kubelet computes it."""
    inits = [r for r in records if r.kind is ContainerKind.INIT]
    apps = [r for r in records if r.kind is ContainerKind.APP]
    for record in inits:
        done = record.terminated if record.state is State.TERMINATED else None
        if done is not None and done.exit_code != 0 and restart_policy == "Never":
            return Phase.FAILED
        if done is None or done.exit_code != 0:
            return Phase.PENDING
    if any(r.state is State.RUNNING for r in apps):
        return Phase.RUNNING
    if not apps or any(r.state is State.WAITING for r in apps):
        # Waiting after a run means a restart is coming: still Running.
        restarting = any(r.state is State.WAITING and r.last_terminated for r in apps)
        return Phase.RUNNING if restarting else Phase.PENDING
    ended = [r.terminated for r in apps if r.terminated is not None]
    if all(t.exit_code == 0 for t in ended):
        return Phase.SUCCEEDED
    return Phase.FAILED


def _condition(kind: str, ok: bool, reason: str = "") -> Obj:
    out: Obj = {"type": kind, "status": "True" if ok else "False"}
    if not ok and reason:
        out["reason"] = reason
    return out


def pod_conditions(
    records: Sequence[ContainerRecord],
    *,
    sandbox_ready: bool,
    readiness_gates: Sequence[str] = (),
    gate_status: Mapping[str, str] | None = None,
    terminal: bool = False,
) -> list[Obj]:
    """The kubelet-owned conditions (without timestamps)."""
    inits = [r for r in records if r.kind is ContainerKind.INIT]
    sidecars = [r for r in records if r.kind is ContainerKind.SIDECAR]
    apps = [r for r in records if r.kind is ContainerKind.APP]
    initialized = all(
        r.state is State.TERMINATED and r.terminated is not None and r.terminated.exit_code == 0
        for r in inits
    ) and all(r.started for r in sidecars)
    if terminal:
        initialized = initialized or bool(apps and all(r.terminated for r in apps))
    containers_ready = not terminal and all(r.ready for r in [*sidecars, *apps])
    gates_ok = all((gate_status or {}).get(g) == "True" for g in readiness_gates)
    return [
        _condition("PodReadyToStartContainers", sandbox_ready),
        _condition("Initialized", initialized, "ContainersNotInitialized"),
        _condition("ContainersReady", containers_ready, "ContainersNotReady"),
        _condition(
            "Ready",
            containers_ready and gates_ok,
            "ContainersNotReady" if not containers_ready else "ReadinessGatesNotReady",
        ),
    ]


def merge_conditions(previous: Sequence[Obj], ours: Sequence[Obj], now: str) -> list[Obj]:
    """``ours`` with transition times kept from ``previous`` where the status is unchanged;
    conditions owned by others (PodScheduled, readiness gates...) are kept as they are."""
    old = {c.get("type"): c for c in previous}
    mine = {c["type"] for c in ours}
    merged = [c for c in previous if c.get("type") not in mine]
    for cond in ours:
        before = old.get(cond["type"])
        same = before is not None and before.get("status") == cond["status"]
        stamp = before.get("lastTransitionTime") if same and before else now
        merged.append({**cond, "lastProbeTime": None, "lastTransitionTime": stamp or now})
    return merged


@dataclass(frozen=True)
class PodFacts:
    """What besides the container records the status depends on."""

    pod_ip: str
    host_ip: str
    start_time: str
    sandbox_ready: bool


def pod_status(
    pod: Obj, records: Sequence[ContainerRecord], facts: PodFacts, now: str
) -> dict[str, Any]:
    """The pod's full ``status`` as this kubelet reports it."""
    spec = pod.get("spec") or {}
    previous = (pod.get("status") or {}).get("conditions") or []
    phase = pod_phase(records, spec.get("restartPolicy", "Always"))
    gates = [g["conditionType"] for g in spec.get("readinessGates") or []]
    gate_status = {c.get("type"): c.get("status") for c in previous}
    ours = pod_conditions(
        records,
        sandbox_ready=facts.sandbox_ready,
        readiness_gates=gates,
        gate_status=gate_status,
        terminal=phase in (Phase.SUCCEEDED, Phase.FAILED),
    )
    status: Obj = {
        "phase": phase.value,
        "conditions": merge_conditions(previous, ours, now),
        "hostIP": facts.host_ip,
        "hostIPs": [{"ip": facts.host_ip}],
        "startTime": facts.start_time,
        "initContainerStatuses": [r.to_json() for r in records if r.kind is not ContainerKind.APP],
        "containerStatuses": [r.to_json() for r in records if r.kind is ContainerKind.APP],
    }
    if facts.pod_ip:
        status["podIP"] = facts.pod_ip
        status["podIPs"] = [{"ip": facts.pod_ip}]
    return status
