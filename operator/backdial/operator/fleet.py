"""Fleet state: what every connected pod's acceptor last reported, and SessionSlice status.

The config server (``configserver.py``) feeds this from the acceptors' streams: the
config version each pod applied and its figures (registered, leased, waiting, per slice
and in total), refreshed every second while they change.  Readers:

* the status of each SessionSlice (:func:`slice_status`, pure: plan + fleet -> status);
* the custom metrics API for the HPA (issue 9) through :meth:`Fleet.get`.

A pod whose stream is gone is dropped at once, so no figure here is older than the
stream's keepalive (``configstream.KEEPALIVE``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backdial.operator.models import ConditionStatus, ConditionType
from backdial.operator.reconcile import Plan

PodKey = tuple[str, str]  # (namespace, pod name)


@dataclass(frozen=True, slots=True)
class SliceFigures:
    leased: int = 0
    waiting: int = 0


@dataclass(slots=True)
class PodState:
    """One connected acceptor: identity, applied config and latest figures."""

    namespace: str
    name: str
    uid: str
    generation: int = 0  # of the config applied (0: none from the operator yet)
    version: str = ""
    owner: str = ""  # SessionSlice key the applied config came from
    registered: int = 0
    leased: int = 0
    waiting: int = 0
    cap: int = 0
    slices: dict[str, SliceFigures] = field(default_factory=dict)
    received: float = 0.0  # time.time() of the last report

    @property
    def utilization(self) -> float:
        """Leased / registered sessions, in percent (0 with no session)."""
        return 100.0 * self.leased / self.registered if self.registered else 0.0


class Fleet:
    """Connected pods by (namespace, name); ``on_change(namespace)`` is told of changes."""

    def __init__(self, on_change: Callable[[str], None] | None = None) -> None:
        self.pods: dict[PodKey, PodState] = {}
        self.on_change = on_change

    def get(self, namespace: str, name: str) -> PodState | None:
        return self.pods.get((namespace, name))

    def connect(self, namespace: str, name: str, uid: str) -> PodState:
        state = PodState(namespace, name, uid, received=time.time())
        self.pods[(namespace, name)] = state
        self._changed(namespace)
        return state

    def disconnect(self, state: PodState) -> None:
        if self.pods.get((state.namespace, state.name)) is state:
            del self.pods[(state.namespace, state.name)]
            self._changed(state.namespace)

    def applied(self, state: PodState, generation: int, version: str, owner: str) -> None:
        state.generation, state.version, state.owner = generation, version, owner
        self._changed(state.namespace)

    def report(self, state: PodState, figures: Mapping[str, Any]) -> None:
        """Record a REPORT (already validated by ``configstream``)."""
        state.registered = int(figures.get("registered", 0))
        state.leased = int(figures.get("leased", 0))
        state.waiting = int(figures.get("waiting", 0))
        state.cap = int(figures.get("cap", 0))
        state.slices = {
            name: SliceFigures(int(v.get("leased", 0)), int(v.get("waiting", 0)))
            for name, v in (figures.get("slices") or {}).items()
        }
        state.received = time.time()
        self._changed(state.namespace)

    def _changed(self, namespace: str) -> None:
        if self.on_change is not None:
            self.on_change(namespace)


def _condition(
    kind: ConditionType, ok: bool, reason: str, message: str, generation: int
) -> dict[str, Any]:
    return {
        "type": kind.value,
        "status": (ConditionStatus.TRUE if ok else ConditionStatus.FALSE).value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def slice_status(
    plan: Plan, fleet: Fleet, scaling: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The status a SessionSlice should have (conditions without transition times);
    *scaling* is its ``ScalingActive`` condition (``hpa.scaling_condition``), None while
    the HPA was not looked at yet."""
    info = plan.slice
    gen = info.generation
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "selectedPods": len(plan.owned),
        "readyPods": 0,
        "configuredPods": 0,
        "perPodSessions": max((c.cap for c in plan.configs.values()), default=0),
        "registeredSessions": 0,
        "leasedSessions": 0,
        "requestsWaiting": 0,
    }
    if not plan.valid:
        msg = plan.error
        status["conditions"] = [
            _condition(ConditionType.READY, False, "InvalidSpec", msg, gen),
            _condition(ConditionType.CONFIG_APPLIED, False, "InvalidSpec", msg, gen),
            _condition(ConditionType.DEGRADED, True, "InvalidSpec", msg, gen),
            _condition(ConditionType.SCALING_ACTIVE, False, "InvalidSpec", msg, gen),
        ]
        return status
    pending: list[str] = []
    for pod in plan.owned:
        state = fleet.get(pod.namespace, pod.name)
        if state is not None and state.uid == pod.uid:
            status["registeredSessions"] += state.registered
            status["leasedSessions"] += state.leased
            status["requestsWaiting"] += state.waiting
        if not pod.ready:
            continue
        status["readyPods"] += 1
        want = plan.configs[pod.name]
        if state is not None and (state.generation, state.version) == (gen, want.version):
            status["configuredPods"] += 1
        else:
            pending.append(pod.name)
    ready, configured = status["readyPods"], status["configuredPods"]
    applied = not pending
    if applied:
        applied_msg = f"{configured} ready pods applied generation {gen}"
    else:
        applied_msg = (
            f"{configured} of {ready} ready pods applied generation {gen}; waiting for "
            + _names(pending)
        )
    status["conditions"] = [
        _condition(
            ConditionType.READY,
            applied and ready > 0,
            "NoReadyPods" if ready == 0 else ("Configured" if applied else "ConfigPending"),
            f"{ready} of {len(plan.owned)} selected pods ready; {applied_msg}",
            gen,
        ),
        _condition(
            ConditionType.CONFIG_APPLIED,
            applied,
            "Applied" if applied else "Pending",
            applied_msg,
            gen,
        ),
        _degraded(plan),
    ]
    if scaling is not None:
        status["conditions"].append({**scaling, "observedGeneration": gen})
    return status


def _degraded(plan: Plan) -> dict[str, Any]:
    gen = plan.slice.generation
    problems: list[str] = []
    reasons: list[str] = []
    if plan.lost or plan.contested:
        reasons.append("Conflict")
        if plan.lost:
            owners = sorted(set(plan.lost.values()))
            problems.append(
                f"{len(plan.lost)} selected pods are configured by older SessionSlice "
                f"{', '.join(owners)} ({_names(sorted(plan.lost))})"
            )
        if plan.contested:
            others = sorted({o for names in plan.contested.values() for o in names})
            problems.append(
                f"{len(plan.contested)} pods are also selected by newer SessionSlice "
                f"{', '.join(others)}, which leaves them to this one"
            )
    if plan.budget_short:
        reasons.append("BudgetTooSmall")
        problems.append(
            f"capacity.totalSessions is {plan.budget_short} short of one session per pod"
        )
    if not reasons:
        return _condition(ConditionType.DEGRADED, False, "AsExpected", "", gen)
    return _condition(ConditionType.DEGRADED, True, ",".join(reasons), "; ".join(problems), gen)


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def stamp_conditions(
    new: list[dict[str, Any]], old: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Add ``lastTransitionTime``: kept from *old* while a condition's status is unchanged."""
    before = {c.get("type"): c for c in old}
    out = []
    for cond in new:
        prev = before.get(cond["type"])
        same = prev is not None and prev.get("status") == cond["status"]
        stamp = prev.get("lastTransitionTime") if same and prev is not None else None
        out.append({**cond, "lastTransitionTime": stamp or now})
    return out
