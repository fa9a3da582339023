"""The HPA a SessionSlice's ``spec.autoscaling`` asks for, and what to do about the live one.

Pure: :func:`desired_hpa` builds the ``autoscaling/v2`` HorizontalPodAutoscaler
(one ``Pods`` metric served by the operator's custom metrics API, owned by the
SessionSlice so deleting the SessionSlice deletes it), and :func:`hpa_action`
compares it with what exists.  Removing ``spec.autoscaling`` deletes the HPA;
an HPA of that name that the SessionSlice does not own is never touched (the
action is ``CONFLICT``, surfaced in the SessionSlice's status).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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
    CONFLICT = "conflict"  # an HPA of that name exists and is not ours


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


def hpa_action(
    desired: Mapping[str, Any] | None, existing: Mapping[str, Any] | None, slice_uid: str
) -> HpaAction:
    if existing is not None and not owned_by(existing, slice_uid):
        return HpaAction.CONFLICT if desired is not None else HpaAction.NONE
    if desired is None:
        return HpaAction.DELETE if existing is not None else HpaAction.NONE
    if existing is None:
        return HpaAction.CREATE
    spec, live = desired["spec"], existing.get("spec") or {}
    same = _subset(spec, live) and ("behavior" in spec or not live.get("behavior"))
    labels = (existing.get("metadata") or {}).get("labels") or {}
    same = same and _subset(desired["metadata"]["labels"], labels)
    return HpaAction.NONE if same else HpaAction.UPDATE


def scaling_condition(action: HpaAction, desired: Mapping[str, Any] | None) -> dict[str, str]:
    """Type/status/reason/message of the SessionSlice's ``ScalingActive`` condition."""
    if action is HpaAction.CONFLICT:
        return {
            "type": "ScalingActive",
            "status": "False",
            "reason": "HPAConflict",
            "message": "a HorizontalPodAutoscaler of this name exists and is not owned by "
            "this SessionSlice; it is left alone",
        }
    if desired is None:
        return {
            "type": "ScalingActive",
            "status": "False",
            "reason": "NoAutoscaling",
            "message": "spec.autoscaling is not set",
        }
    metric = desired["spec"]["metrics"][0]["pods"]
    return {
        "type": "ScalingActive",
        "status": "True",
        "reason": "HPAManaged",
        "message": f"HPA {desired['metadata']['name']} scales "
        f"{desired['spec']['scaleTargetRef']['name']} on {metric['metric']['name']} "
        f"(average {metric['target']['averageValue']} per pod)",
    }
