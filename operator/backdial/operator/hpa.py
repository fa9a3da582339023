"""The HPA a SessionSlice's ``spec.autoscaling`` asks for, and what to do about the live one.

Pure: :func:`desired_hpa` builds the ``autoscaling/v2`` HorizontalPodAutoscaler
(one ``Pods`` metric served by the operator's custom metrics API, owned by the
SessionSlice so deleting the SessionSlice deletes it), :func:`decide` compares it
with the namespace's live HPAs (create, update, delete, or nothing; conflicts with
HPAs someone else owns), and :func:`scaling_condition` turns the live HPA's
conditions, as the HPA controller reports them, into the SessionSlice's
``ScalingActive`` condition.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from backdial.operator.metricsapi import MetricName, quantity

API_VERSION = "autoscaling/v2"
MANAGED_BY = "backdial-operator"
SLICE_LABEL = "backdial.dev/sessionslice"
_METRICS = {
    "requestsWaiting": MetricName.REQUESTS_WAITING,
    "sessionUtilization": MetricName.SESSION_UTILIZATION,
}


class HpaAction(enum.Enum):
    NONE = "none"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


def hpa_name(slice_name: str) -> str:
    return slice_name


def desired_hpa(
    namespace: str,
    slice_name: str,
    slice_uid: str,
    slice_api_version: str,
    autoscaling: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """The HPA for a SessionSlice (None without ``spec.autoscaling``)."""
    if not autoscaling:
        return None
    target = autoscaling["target"]
    metric = _METRICS[target["metric"]]
    ref = autoscaling["scaleTargetRef"]
    spec: dict[str, Any] = {
        "scaleTargetRef": {
            "apiVersion": ref.get("apiVersion", "apps/v1"),
            "kind": ref.get("kind", "Deployment"),
            "name": ref["name"],
        },
        "minReplicas": int(autoscaling.get("minReplicas", 1)),
        "maxReplicas": int(autoscaling["maxReplicas"]),
        "metrics": [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": metric.value},
                    "target": {
                        "type": "AverageValue",
                        "averageValue": quantity(float(target["averageValue"])),
                    },
                },
            }
        ],
    }
    if autoscaling.get("behavior"):
        spec["behavior"] = autoscaling["behavior"]
    return {
        "apiVersion": API_VERSION,
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": hpa_name(slice_name),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, SLICE_LABEL: slice_name},
            "ownerReferences": [
                {
                    "apiVersion": slice_api_version,
                    "kind": "SessionSlice",
                    "name": slice_name,
                    "uid": slice_uid,
                    "controller": True,
                }
            ],
        },
        "spec": spec,
    }


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def _subset(want: Any, have: Any) -> bool:
    """Every field of *want* is in *have* (the API server may add defaults to the rest)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(_subset(w, h) for w, h in zip(want, have, strict=True))
        )
    return bool(want == have)


def _target(hpa: Mapping[str, Any]) -> tuple[str, str, str]:
    """(API group, kind, name) of an HPA's scale target (the version does not matter)."""
    ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
    group = str(ref.get("apiVersion", "")).rpartition("/")[0]
    return group, str(ref.get("kind", "")), str(ref.get("name", ""))


@dataclass(frozen=True, slots=True)
class HpaDecision:
    """What to do about a SessionSlice's HPA, given every HPA of its namespace."""

    action: HpaAction
    existing: Mapping[str, Any] | None  # the HPA of the SessionSlice's name, if any
    conflicts: tuple[str, ...] = ()  # HPAs not ours that stand in the way, by name

    @property
    def ours(self) -> Mapping[str, Any] | None:
        return self.existing if self.existing is not None and not self.conflicts else None


def decide(
    desired: Mapping[str, Any] | None, live: Iterable[Mapping[str, Any]], slice_uid: str
) -> HpaDecision:
    """The action that makes the namespace's HPAs match *desired* (None: no autoscaling).

    An HPA the SessionSlice does not own is never touched. One that has the SessionSlice's
    name, or scales the same target (two HPAs on one target fight, and the HPA controller
    stops both), is a conflict: the operator then keeps no HPA of its own, so the other
    one works, and creates its own again once the other is gone.
    """
    hpas = list(live)
    name = desired["metadata"]["name"] if desired is not None else None
    existing = next((h for h in hpas if (h.get("metadata") or {}).get("name") == name), None)
    if desired is None:
        existing = next((h for h in hpas if owned_by(h, slice_uid)), None)
        return HpaDecision(HpaAction.DELETE if existing else HpaAction.NONE, existing)
    target = _target(desired)
    conflicts = tuple(
        sorted(
            str(h["metadata"]["name"])
            for h in hpas
            if not owned_by(h, slice_uid)
            and (h["metadata"].get("name") == name or _target(h) == target)
        )
    )
    if conflicts:
        ours = existing is not None and owned_by(existing, slice_uid)
        return HpaDecision(HpaAction.DELETE if ours else HpaAction.NONE, existing, conflicts)
    if existing is None:
        return HpaDecision(HpaAction.CREATE, None)
    spec, have = desired["spec"], existing.get("spec") or {}
    same = _subset(spec, have) and ("behavior" in spec or not have.get("behavior"))
    labels = (existing.get("metadata") or {}).get("labels") or {}
    same = same and _subset(desired["metadata"]["labels"], labels)
    return HpaDecision(HpaAction.NONE if same else HpaAction.UPDATE, existing)


_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")  # a condition reason


def _condition(status: str, reason: str, message: str) -> dict[str, str]:
    if not _REASON.match(reason):
        reason = "HPAReported"
    return {"type": "ScalingActive", "status": status, "reason": reason, "message": message}


def scaling_condition(decision: HpaDecision, desired: Mapping[str, Any] | None) -> dict[str, str]:
    """Type/status/reason/message of the SessionSlice's ``ScalingActive`` condition: what
    the real HPA controller says about the HPA the operator owns (its ``AbleToScale``,
    ``ScalingActive`` and ``ScalingLimited`` conditions), or why there is none."""
    if desired is None:
        return _condition("False", "NoAutoscaling", "spec.autoscaling is not set")
    name = desired["metadata"]["name"]
    ref = desired["spec"]["scaleTargetRef"]
    target = f"{ref['kind']} {ref['name']}"
    if decision.conflicts:
        return _condition(
            "False",
            "HPAConflict",
            f"HorizontalPodAutoscaler {', '.join(decision.conflicts)} is not owned by this "
            f"SessionSlice and has its name or scales {target}; it is left alone and this "
            "SessionSlice keeps no HPA until it is gone",
        )
    hpa = decision.ours
    if hpa is None or decision.action is HpaAction.CREATE:
        return _condition("Unknown", "HPAPending", f"creating HorizontalPodAutoscaler {name}")
    status = hpa.get("status") or {}
    found = {c.get("type"): c for c in status.get("conditions") or []}
    able, active, limited = (found.get(t) or {} for t in _HPA_CONDITIONS)
    for cond in (able, active):
        if cond and cond.get("status") != "True":
            return _condition(
                "False" if cond.get("status") == "False" else "Unknown",
                str(cond.get("reason") or "HPAReported"),
                f"HPA {name}: {cond.get('message', '')}",
            )
    if not active:
        return _condition(
            "Unknown", "HPAPending", f"HPA {name} created; the HPA controller has not reported yet"
        )
    metric = desired["spec"]["metrics"][0]["pods"]
    message = (
        f"HPA {name} scales {target} on {metric['metric']['name']} (average "
        f"{metric['target']['averageValue']} per pod): {status.get('currentReplicas', 0)} "
        f"replicas, {status.get('desiredReplicas', 0)} desired"
    )
    if limited.get("status") == "True":
        message += f"; limited ({limited.get('reason')}): {limited.get('message', '')}"
    return _condition("True", str(active.get("reason") or "HPAManaged"), message)


_HPA_CONDITIONS = ("AbleToScale", "ScalingActive", "ScalingLimited")
